"""Errors of the data pipeline."""

from __future__ import annotations


class DataError(Exception):
    """Base class of the data pipeline's errors."""


class ManifestError(DataError):
    """The manifest is malformed or does not match the shards beside it."""


class BadSampleError(DataError):
    """A sample cannot be used: truncated shard, missing field, wrong shape, NaN, ...

    The message always names the shard file and the sample key.
    """

    def __init__(self, shard: str, key: str, reason: str):
        self.shard = shard
        self.key = key
        self.reason = reason
        super().__init__(f"bad sample in shard '{shard}', key '{key}': {reason}")

    def __reduce__(self):
        # Keeps the fields when the error crosses from a loader worker to the main process.
        return (type(self), (self.shard, self.key, self.reason))


class StorageError(DataError):
    """Reading from storage failed for good (after retries, or a non-transient error)."""


class WriterError(DataError):
    """A dataset cannot be written (e.g. the output folder holds a different job)."""
