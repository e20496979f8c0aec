"""One writer per store: the lease a run holds on its store (and the store's staging folder).

A run takes the lease before it reads a store to decide what to do with it, holds it to the end,
and every commit is fenced by it: a writer that lost its lease cannot commit.

- **A local store**: an OS lock (``fcntl.flock``) on ``.NAME.actscope-lock`` beside the store
  (``NAME`` the store folder's name; the staging folder ``.NAME.actscope-new`` is covered too).
  The kernel releases it when its process dies, however it dies, so a dead owner's lease is
  taken over by the next run with nothing to clean. The file holds its owner (host, process,
  start time, token) for the message a second writer gets, and is removed on release.
- **An object store** (S3 and compatibles): an object ``.NAME.actscope-lease`` beside the store,
  created only where none is (``If-None-Match: *``), renewed by the owner every ``TTL / 4``
  (``If-Match`` its ETag) and taken over once expired (``If-Match`` the expired one's ETag, so of
  two runs taking it over one wins). A writer stops committing once its lease is within
  ``MARGIN`` of expiry without renewal.

Readers take no lease: they read committed data only, as before.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Self

from actscope.storage.errors import StoreError, first_line
from actscope.storage.urls import filesystem

#: Seconds an object-store lease lives unless renewed; renewed every quarter of it.
TTL = 120.0
#: A writer commits only while its lease has at least this long to live.
MARGIN = 20.0


class StoreBusy(StoreError):
    """Another run holds the store's lease."""


class LeaseLost(StoreError):
    """This run's lease was taken over (it expired, or its file was removed): it may not commit."""


@dataclass(frozen=True)
class Owner:
    host: str
    pid: int
    started: str  # local time, for people
    token: str  # what commits are fenced by
    expires: float = 0.0  # epoch seconds (object stores); 0: held while the process lives

    @classmethod
    def new(cls) -> Owner:
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), uuid.uuid4().hex)

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}, started {self.started}"

    def encode(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def decode(cls, data: bytes) -> Owner | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None  # being written, or not ours: the caller says "another run"


def lease_url(store_url: str) -> str:
    """Where the lease of the store at ``store_url`` lives: beside it, named after it."""
    if "://" in store_url:
        protocol, rest = store_url.split("://", 1)
        parent, name = posixpath.split(rest.rstrip("/"))
        if not parent or not name:
            raise StoreError(f"store: {store_url} is a bucket's root; give the store a path inside the bucket (e.g. {store_url.rstrip('/')}/job.zarr).")
        return f"{protocol}://{parent}/.{name}.actscope-lease"
    real = os.path.realpath(os.path.expanduser(store_url.removeprefix("file://")))
    return os.path.join(os.path.dirname(real), f".{os.path.basename(real)}.actscope-lock")


def _busy(store_url: str, owner: Owner | None) -> StoreBusy:
    who = owner.describe() if owner else "another run"
    return StoreBusy(
        f"store: {store_url} is being written by {who}. One run writes a store at a time: wait for it to finish, "
        "or stop it; a run whose process is gone frees the store by itself."
    )


class Lease:
    """A held lease: ``check()`` before every commit, ``release()`` at the end (or ``with``)."""

    def __init__(self, store_url: str, owner: Owner):
        self.store_url = store_url
        self.owner = owner

    @property
    def token(self) -> str:
        return self.owner.token

    @classmethod
    def acquire(cls, store_url: str) -> Lease:
        """Take the store's lease now, or raise ``StoreBusy`` naming its holder."""
        url = lease_url(store_url)
        if "://" in url:
            return _ObjectLease.take(store_url, url)
        return _LocalLease.take(store_url, url)

    @property
    def fence(self) -> Fence:
        return Fence(self.store_url, lease_url(self.store_url), self.token)

    def check(self) -> None:
        self.fence.check()

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@dataclass(frozen=True)
class Fence:
    """What a writer checks before each commit, in whatever process it runs (workers are given
    it): the lease is still held with this token and, on an object store, not about to expire."""

    store_url: str
    lease_url: str
    token: str

    def check(self) -> None:
        owner = _ObjectLease.read(self.lease_url)[0] if "://" in self.lease_url else _LocalLease.read(self.lease_url)
        if owner is not None and owner.token == self.token and (not owner.expires or owner.expires - time.time() >= MARGIN):
            return
        how = f"taken over by {owner.describe()}" if owner is not None and owner.token != self.token else "expired or removed"
        raise LeaseLost(f"store: {self.store_url}: this run's lease on the store was lost ({how}); it committed nothing more. Run the job again.")


class _LocalLease(Lease):
    def __init__(self, store_url: str, owner: Owner, path: str, fd: int):
        super().__init__(store_url, owner)
        self._path, self._fd = path, fd

    @classmethod
    def take(cls, store_url: str, path: str) -> _LocalLease:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        for _ in range(100):  # another run may remove the file between our open and our lock
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise StoreError(f"store: {path} (the store's lock file) is a symbolic link; remove it.") from None
                raise StoreError(f"store: cannot create the store's lock file {path} ({first_line(err)}).") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise _busy(store_url, cls.read(path)) from None
            try:
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                owner = Owner.new()
                os.ftruncate(fd, 0)
                os.pwrite(fd, owner.encode(), 0)
                return cls(store_url, owner, path, fd)
            os.close(fd)  # we locked a file its last owner had just removed: try the new one
        raise StoreError(f"store: could not take the lock {path}; try again.")

    @staticmethod
    def read(path: str) -> Owner | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return None
        try:
            return Owner.decode(os.read(fd, 4096))
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            if _LocalLease.read(self._path) == self.owner:
                os.unlink(self._path)  # before unlocking: the next run creates a fresh file
        os.close(self._fd)  # releases the lock
        self._fd = -1


class _ObjectLease(Lease):
    def __init__(self, store_url: str, owner: Owner, url: str, etag: str):
        super().__init__(store_url, owner)
        self._url, self._etag = url, etag
        self._stop = threading.Event()
        self._renewer = threading.Thread(target=self._renew_until_released, name="lease-renewer", daemon=True)
        self._renewer.start()

    @staticmethod
    def _s3(url: str):
        fs, path = filesystem(url)
        if not hasattr(fs, "call_s3"):
            raise StoreError(f"store: {url}: leases need conditional writes, which actscope uses on S3 and S3-compatible stores only.")
        bucket, key = path.split("/", 1)
        return fs, bucket, key

    @classmethod
    def read(cls, url: str) -> tuple[Owner | None, str | None]:
        """The lease's owner and ETag, read in one request; (None, None) where there is none."""
        from fsspec.asyn import sync

        fs, bucket, key = cls._s3(url)

        async def get():
            got = await fs._call_s3("get_object", Bucket=bucket, Key=key)
            async with got["Body"] as body:
                return await body.read(), got["ETag"]

        try:
            data, etag = sync(fs.loop, get)
        except FileNotFoundError:
            return None, None
        return Owner.decode(data), etag

    @classmethod
    def _put(cls, url: str, owner: Owner, **condition) -> str | None:
        """Write the lease if ``condition`` holds; its new ETag, or None where it did not hold."""
        fs, bucket, key = cls._s3(url)
        try:
            return fs.call_s3("put_object", Bucket=bucket, Key=key, Body=owner.encode(), **condition)["ETag"]
        except (FileExistsError, OSError) as err:
            if isinstance(err, FileExistsError) or "pre-condition" in str(err) or "PreconditionFailed" in str(err) or "conflict" in str(err).lower():
                return None
            raise

    @classmethod
    def take(cls, store_url: str, url: str) -> _ObjectLease:
        owner = Owner.new()
        owner = Owner(owner.host, owner.pid, owner.started, owner.token, time.time() + TTL)
        etag = cls._put(url, owner, IfNoneMatch="*")
        if etag is None:
            current, current_etag = cls.read(url)
            if current is not None and current.expires > time.time():
                raise _busy(store_url, current)
            # Expired (its owner stopped renewing: it is gone): take it over, unless another run
            # takes it first.
            etag = cls._put(url, owner, IfMatch=current_etag) if current_etag else cls._put(url, owner, IfNoneMatch="*")
            if etag is None:
                raise _busy(store_url, cls.read(url)[0])
        return cls(store_url, owner, url, etag)

    def _renew_until_released(self) -> None:
        while not self._stop.wait(TTL / 4):
            owner = Owner(self.owner.host, self.owner.pid, self.owner.started, self.owner.token, time.time() + TTL)
            with contextlib.suppress(Exception):  # a missed renewal is seen by the fence
                etag = self._put(self._url, owner, IfMatch=self._etag)
                if etag is None:
                    return  # taken over: the fence refuses every later commit
                self.owner, self._etag = owner, etag

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._renewer.join()
        fs, bucket, key = self._s3(self._url)
        with contextlib.suppress(Exception):  # a lease that is not ours any more is left to its owner
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
