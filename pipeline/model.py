"""The model: a TransformerLens 4 ``TransformerBridge`` over a Hugging Face model.

Activations are the bridge's default numerics, which are the Hugging Face modules' own outputs
(not compatibility mode's folded weights). The forward pass stops right after the last hooked
block: no final norm, no unembedding, no logits.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import warnings
from dataclasses import dataclass

import torch

from actscope.storage.errors import ModelError, cause
from actscope.storage.record import ModelRecord
from actscope.storage.spec import JobSpec

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda was asked for, but torch sees no CUDA device. Use device: auto or cpu.")
    return torch.device(requested)


def _local(model: str) -> str:
    """An existing folder as an absolute path: TransformerLens reads some bare names ("neox",
    "gpt2-small", ...) as aliases of hub models, even where a folder of that name exists."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def load_tokenizer(model: str, revision: str | None = None):
    from transformers import AutoTokenizer

    model = _local(model)
    _quiet_transformers()
    try:
        return AutoTokenizer.from_pretrained(model, revision=revision)
    except Exception as err:  # noqa: BLE001 - a broken model folder fails in many ways (types, values, files)
        raise ModelError(_load_failure(model, err)) from None


def load_model(
    model: str, device: torch.device, *, dtype: str = "float32", revision: str | None = None, tokenizer=None
):
    """Boot the bridge over a Hugging Face directory or hub id, on ``device``, in eval mode."""
    from transformer_lens.model_bridge import TransformerBridge

    model = _local(model)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model, revision)
    _quiet_transformers()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(
                model, device=device, dtype=_DTYPES[dtype], tokenizer=tokenizer, revision=revision
            )
    except Exception as err:  # noqa: BLE001 - a config of the wrong types fails deep inside transformers
        raise ModelError(_load_failure(model, err)) from None
    bridge.eval()
    return bridge


class Skeleton:
    """The model built from its ``config.json`` and tokenizer alone: the bridge over modules whose
    parameters are fake tensors (torch's ``FakeTensorMode``: shapes and dtypes, no storage). Hook
    names, widths, the forward plan and the weights' size are known from it without reading or
    allocating a weight, so a job is planned in seconds whatever the model's size, from a folder
    that holds no weights at all."""

    def __init__(self, bridge, mode):
        self.bridge, self.mode = bridge, mode

    def weight_bytes(self, dtype: str) -> int:
        """The weights' bytes in ``dtype`` (shared parameters, such as tied embeddings, once)."""
        return sum(p.numel() for p in self.bridge.original_model.parameters()) * _DTYPES[dtype].itemsize

    def widths(self, hooks: list[str]) -> dict[str, int]:
        """The widths of ``hooks`` that a forward of fake tensors through the Hugging Face modules
        gives, in one forward where it can, else each half on its own (so that a few hooks that
        cannot be measured do not cost a forward for every hook). Left out: a hook only the
        bridge has (its forward reads values, which fake tensors do not have) or one that does
        not fire; the caller loads the weights for those, or has no width."""
        found = self._measure(hooks) if hooks else {}
        if found is not None or len(hooks) == 1:
            return found or {}
        half = len(hooks) // 2
        return self.widths(hooks[:half]) | self.widths(hooks[half:])

    def _measure(self, hooks: list[str]) -> dict[str, int] | None:
        """Every hook's width from one fake forward, or None where it cannot be had."""
        plan = forward_plan(self.bridge, hooks)
        if "bridge_only" in plan:
            return None
        last = HookedForward.last_block(hooks)
        stop = plan["blocks"][last] if last is not None and plan.get("blocks") else None
        sites = {h: ModuleSite(*site) for h, site in plan["sites"].items()}
        with self.mode:
            forward = ModuleForward(self.bridge.original_model, sites, stop)
            try:
                tokens = torch.zeros((1, 3), dtype=torch.long)
                acts = forward(tokens, torch.ones_like(tokens))
            except Exception:  # noqa: BLE001 - an architecture whose forward reads values: load the weights
                return None
            finally:
                forward.close()
        return {name: int(tensor.shape[-1]) for name, tensor in acts.items()}


def load_skeleton(model: str, *, revision: str | None = None, tokenizer=None) -> Skeleton:
    """The bridge over ``model`` built from its config, with fake parameters (see ``Skeleton``)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformer_lens.model_bridge import TransformerBridge

    model = _local(model)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model, revision)
    _quiet_transformers()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        with warnings.catch_warnings(), mode:
            warnings.simplefilter("ignore")
            bridge = TransformerBridge.boot_transformers(model, tokenizer=tokenizer, revision=revision, load_weights=False)
    except Exception as err:  # noqa: BLE001 - as in load_model
        raise ModelError(_load_failure(model, err)) from None
    bridge.eval()
    return Skeleton(bridge, mode)


def load_job_model(spec: JobSpec, device: torch.device, tokenizer=None):
    """The job's model, in the job's dtype."""
    return load_model(spec.model, device, dtype=spec.dtype, revision=spec.model_revision, tokenizer=tokenizer)


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _load_failure(model: str, err: Exception) -> str:
    why = cause(err)
    if os.path.exists(model):
        return f"model: cannot load {model} as a Hugging Face model directory ({why})."
    if os.path.sep in model or model.startswith("."):
        return f"model: {model} does not exist. Give a Hugging Face model directory or a hub id."
    return (
        f"model: cannot load {model!r}: it is not a local directory and the hub could not provide "
        f"it (offline, or no such model). Cause: {why}"
    )


def prefer_sdpa(bridge, hooks: list[str]) -> bool:
    """Put attention back on PyTorch's SDPA kernel, Hugging Face's own default, when no hook
    inside attention is recorded (the bridge boots in eager mode so that such hooks fire).
    Models whose bridge reimplements attention (GPT-2's) are unaffected. True if switched."""
    if any(".attn." in hook for hook in hooks):
        return False
    model = bridge.original_model
    try:
        model.set_attn_implementation("sdpa")
    except (AttributeError, ValueError, ImportError):
        return False
    return model.config._attn_implementation == "sdpa"


def validate_hooks(bridge, hooks: list[str]) -> None:
    """Raise ModelError naming every unknown hook with the closest valid names."""
    valid = sorted(bridge.hook_dict)
    problems = []
    for hook in hooks:
        if hook in bridge.hook_dict:
            continue
        close = difflib.get_close_matches(hook, valid, n=5, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        problems.append(f"  - {hook} is not a hook of this model.{hint}")
    if problems:
        n_layers = bridge.cfg.n_layers
        examples = ", ".join(
            f"blocks.{n_layers - 1}.{name}" for name in ("mlp.hook_pre", "mlp.hook_post", "hook_resid_post", "hook_attn_out")
        )
        raise ModelError(
            "hooks: unknown hook name(s):\n" + "\n".join(problems)
            + f"\nThis model has {n_layers} blocks (0..{n_layers - 1}); per-token hooks include {examples}."
            + " `actscope hooks MODEL` lists them all."
        )


def per_token_hooks(bridge) -> list[str]:
    """The hook names whose output is one vector per token (for listing to a user)."""
    return sorted(h for h in bridge.hook_dict if not h.endswith(("hook_pattern", "hook_attn_scores")))


@dataclass(frozen=True)
class Framing:
    """How sequences are framed: prefix and suffix special tokens, the document separator."""

    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    separator: tuple[int, ...]
    pad: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> Framing:
        """Encoders (CLS and SEP defined) get [CLS] ... [SEP]; decoders get a BOS and an EOS between
        documents. The bridge's own bos id is not used: for BERT-style models it reports [UNK]."""
        cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        if cls_id is not None and sep_id is not None:
            return cls((cls_id,), (sep_id,), (sep_id,), pad if pad is not None else sep_id)
        separator = (eos,) if eos is not None else ()
        prefix = (bos,) if bos is not None else ()
        fallback_pad = eos if eos is not None else (bos if bos is not None else 0)
        return cls(prefix, (), separator, pad if pad is not None else fallback_pad)

    def to_dict(self) -> dict:
        return {"prefix": list(self.prefix), "suffix": list(self.suffix), "separator": list(self.separator), "pad": self.pad}


class HookedForward:
    """Runs the bridge and returns the hooked activations as [batch, pos, width] tensors.

    Hooks are attached once for the life of the object (a worker owns its model). When every hook
    lies inside ``blocks.N``, the forward stops after the last such block: a hook on its output
    raises ``StopAtLayerException``, which the bridge catches and returns from.
    """

    def __init__(self, bridge, hooks: list[str]):
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        self.bridge = bridge
        self.hooks = list(hooks)
        self._captured: dict[str, torch.Tensor] = {}
        for hook in self.hooks:
            bridge.add_hook(hook, self._capture(hook), is_permanent=True)
        last = self.last_block(self.hooks)
        if last is not None:

            def stop(tensor, hook):
                raise StopAtLayerException(tensor)

            # Registered after the capturing hooks, so on a shared hook point they run first.
            bridge.add_hook(f"blocks.{last}.hook_out", stop, is_permanent=True)

    @staticmethod
    def last_block(hooks: list[str]) -> int | None:
        """The last block every hook lies in, or None if some hook is outside the blocks."""
        layers = [_BLOCK.match(h) for h in hooks]
        if not all(layers):
            return None
        return max(int(m.group(1)) for m in layers)

    def _capture(self, name: str):
        def hook(tensor, hook):
            self._captured[name] = tensor
            return tensor

        return hook

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured.clear()
        self.bridge(tokens, attention_mask=attention_mask, return_type=None)
        return _per_token(self._captured, self.hooks, tokens.shape)


def _per_token(captured: dict[str, torch.Tensor], hooks: list[str], shape) -> dict[str, torch.Tensor]:
    """The captured values as [batch, pos, width], each checked to be one vector per token; the
    capture dict is emptied (it must not keep a batch alive)."""
    batch, pos = shape
    out = {}
    for name in hooks:
        if name not in captured:
            raise ModelError(f"hook {name} did not fire during the forward pass; it cannot be recorded.")
        tensor = captured[name]
        if tensor.shape[:2] != (batch, pos):
            raise ModelError(
                f"hook {name} gives shape {tuple(tensor.shape)}, not [batch, pos, ...]: "
                "it is not one vector per token and cannot be recorded."
            )
        out[name] = tensor.reshape(batch, pos, -1)
    captured.clear()
    return out


# ---- The Hugging Face model itself, with torch hooks on its modules ---------------------------
#
# Most hooks a researcher records are the input or the output of a module of the Hugging Face
# model (``blocks.3.mlp.hook_post`` is the input of GPT-2's ``transformer.h.3.mlp.c_proj``). For
# those the workers run the Hugging Face model itself, with its own attention kernel (SDPA), and
# plain forward hooks: no bridge components on the hot path. The bridge stays the authority on
# names: the map from a hook to its module is read from the bridge's own components at plan time.
# Hooks that exist only inside the bridge's reimplementation (attention scores and patterns, split
# q/k/v, normalisation scales) keep the bridge's forward.


class _Stop(Exception):
    """Raised by a hook on the last needed block's output: nothing after it runs."""


@dataclass(frozen=True)
class ModuleSite:
    """A hook's value on the Hugging Face model: the ``side`` ("input" or "output") of ``module``
    (a path in the model, as ``model.get_submodule`` takes it)."""

    module: str
    side: str


def _module_paths(bridge) -> dict[int, str]:
    """Each bridge component that wraps a module of the Hugging Face tree, by id: that module's
    path in a plain Hugging Face model of the same class. Components the bridge adds itself
    (GPT-2's split q, k and v, BERT's MLP view of a whole layer) are not in the tree: no path."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    paths: dict[int, str] = {}

    def walk(module, path: str) -> None:
        if isinstance(module, GeneralizedComponent):
            paths.setdefault(id(module), path)
            module = module.original_component
            if module is None:
                return
        for name, child in module._modules.items():
            if child is not None and name != "_original_component":
                walk(child, f"{path}.{name}" if path else name)

    walk(bridge.original_model, "")
    return paths


# Hooks of the blocks and the token embeddings. The heads' hooks keep the bridge: its ``ln_final``
# and ``unembed`` of an encoder are not the values of the modules they wrap (BERT's MLM head), and
# a position embedding module's output is not per token ([1, pos, d], broadcast by the bridge).
_ON_MODULES = re.compile(r"^(blocks\.\d+\.|hook_embed$|embed\.|embed_ln\.)")


def module_sites(bridge, hooks: list[str], paths: dict[int, str] | None = None) -> dict[str, ModuleSite]:
    """The hooks among ``hooks`` whose value is a Hugging Face module's input or output (the
    bridge's ``<component>.hook_in`` / ``.hook_out`` of a component that wraps that module).
    ``paths``: ``_module_paths(bridge)``, if the caller has it."""
    paths = paths if paths is not None else _module_paths(bridge)
    sites = {}
    for hook in hooks:
        if not _ON_MODULES.match(hook):
            continue
        point = bridge.hook_dict.get(hook)
        component, _, end = (point.name if point is not None else "").rpartition(".")
        if end not in ("hook_in", "hook_out") or not component:
            continue
        try:
            path = paths.get(id(bridge.get_submodule(component)))
        except AttributeError:
            continue
        if path is not None:
            sites[hook] = ModuleSite(path, "input" if end == "hook_in" else "output")
    return sites


def forward_plan(bridge, hooks: list[str]) -> dict:
    """What the workers run, decided at plan time and kept in the store's model record:
    ``{"class", "sites", "blocks"}`` when every hook is on a Hugging Face module, else
    ``{"bridge_only": [...]}`` (the hooks that need the bridge's forward)."""
    paths = _module_paths(bridge)
    sites = module_sites(bridge, hooks, paths)
    missing = [h for h in hooks if h not in sites]
    if missing:
        return {"bridge_only": missing}
    blocks = [paths.get(id(block)) for block in bridge.blocks]
    return {
        "class": type(bridge.original_model).__name__,
        "sites": {h: [s.module, s.side] for h, s in sites.items()},
        "blocks": blocks if all(blocks) else None,
    }


def describe_forward(plan: dict | None) -> str:
    """One line for a user: which forward the workers run, and why."""
    if not plan:
        return "the bridge's forward (a store made before module hooks)"
    if "bridge_only" in plan:
        return "the bridge's forward: " + ", ".join(plan["bridge_only"][:5]) + " exist only inside the bridge"
    return f"the Hugging Face model's own forward ({plan['class']}, SDPA attention), torch hooks on its modules"


def load_hf_model(spec: JobSpec, class_name: str, device: torch.device):
    """The plain Hugging Face model the bridge wraps, in the job's dtype, with SDPA attention where
    the architecture has it (else its default), in eval mode."""
    import transformers

    _quiet_transformers()
    cls = getattr(transformers, class_name)
    name = _local(spec.model)
    kwargs = {"dtype": _DTYPES[spec.dtype], "revision": spec.model_revision}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = cls.from_pretrained(name, attn_implementation="sdpa", **kwargs)
            except (ValueError, ImportError):  # no SDPA for this architecture
                model = cls.from_pretrained(name, **kwargs)
    except Exception as err:  # noqa: BLE001 - as in load_model
        raise ModelError(_load_failure(spec.model, err)) from None
    return model.to(device).eval()


class ModuleForward:
    """Runs the Hugging Face model and returns the hooked modules' inputs or outputs as
    [batch, pos, width] tensors; stops after ``stop`` (a module path: the last needed block)."""

    def __init__(self, model, sites: dict[str, ModuleSite], stop: str | None):
        self.model = model
        self.hooks = list(sites)
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = []
        for hook, site in sites.items():
            module = model.get_submodule(site.module)
            if site.side == "input":
                self._handles.append(module.register_forward_pre_hook(self._input(hook), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._output(hook)))
        if stop is not None:
            # Registered after the capturing hooks, so on the same module they run first.
            self._handles.append(model.get_submodule(stop).register_forward_hook(self._stop))
        config = getattr(model, "config", None)
        self._extra = {"use_cache": False} if getattr(config, "use_cache", None) is not None else {}

    def _input(self, name: str):
        def hook(module, args, kwargs):
            value = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            self._captured[name] = value

        return hook

    def _output(self, name: str):
        def hook(module, args, output):
            self._captured[name] = output[0] if isinstance(output, (tuple, list)) else output

        return hook

    @staticmethod
    def _stop(module, args, output):
        raise _Stop

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @torch.inference_mode()
    def __call__(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        self._captured.clear()
        try:
            self.model(input_ids=tokens, attention_mask=attention_mask, **self._extra)
        except _Stop:
            pass
        return _per_token(self._captured, self.hooks, tokens.shape)


def job_forward(spec: JobSpec, model_record: ModelRecord, device: torch.device, hooks: list[str] | None = None):
    """The forward a worker runs for ``hooks`` (default: the job's): the Hugging Face model with
    module hooks when the plan found every hook on a module, else the bridge (SDPA when no hook
    is inside attention)."""
    hooks = list(hooks or spec.sites)
    saes = model_record.saes
    if any(h in saes for h in hooks):
        from actscope.pipeline.sae import Encoder, SAEInfo

        encoders = {h: Encoder(SAEInfo(**saes[h]), device) for h in hooks if h in saes}
        inputs = sorted({e.info.hook for e in encoders.values()} | {h for h in hooks if h not in saes}, key=spec.hooks.index)
        return WithSAEs(job_forward(spec, model_record, device, inputs), encoders, hooks)
    plan = model_record.forward or {}
    sites = plan.get("sites") or {}
    if plan.get("class") and all(h in sites for h in hooks):
        last = HookedForward.last_block(hooks)
        stop = plan["blocks"][last] if last is not None and plan.get("blocks") else None
        model = load_hf_model(spec, plan["class"], device)
        return ModuleForward(model, {h: ModuleSite(*sites[h]) for h in hooks}, stop)
    bridge = load_job_model(spec, device)
    prefer_sdpa(bridge, hooks)
    return HookedForward(bridge, hooks)


class WithSAEs:
    """A forward whose result also holds SAE latents: each SAE encodes its hook's activations
    (on the same device), and the result holds exactly the sites asked for. ``nonzeros``: the
    last call's non-zero latents of the SAEs whose encoder chose them (top-k), over the call's
    tokens flattened, for the worker's statistics (``pipeline.nonzero``)."""

    def __init__(self, forward, encoders: dict, sites: list[str]):
        self.forward, self.encoders, self.sites = forward, encoders, sites
        self.bridge = getattr(forward, "bridge", None)
        self.nonzeros: dict = {}

    def __call__(self, tokens: torch.Tensor, attention: torch.Tensor) -> dict[str, torch.Tensor]:
        acts = self.forward(tokens, attention)
        self.nonzeros = {}
        for name, encoder in self.encoders.items():
            x = acts[encoder.info.hook]
            latents, nonzeros = encoder.encode_with_nonzeros(x.reshape(-1, x.shape[-1]))
            acts[name] = latents.reshape(*x.shape[:-1], -1)
            if nonzeros is not None and name in self.sites:
                self.nonzeros[name] = nonzeros
        return {site: acts[site] for site in self.sites}

    def close(self) -> None:
        if hasattr(self.forward, "close"):
            self.forward.close()


def hook_widths(bridge, hooks: list[str]) -> dict[str, int]:
    """Each hook's width (neurons per token), from a forward pass on a tiny input."""
    forward = HookedForward(bridge, hooks)
    try:
        device = next(bridge.parameters()).device
        tokens = torch.zeros((1, 3), dtype=torch.long, device=device)
        acts = forward(tokens, torch.ones_like(tokens))
    finally:
        bridge.reset_hooks(including_permanent=True)
    return {name: int(tensor.shape[-1]) for name, tensor in acts.items()}
