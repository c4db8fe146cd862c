"""Composite-latent data pipeline of sfd-train (imported as ``sfd_train.data_pipeline``).

Modules, one job each: ``format`` (shard fields and byte layout), ``compact``
(int8 REPA features), ``manifest``,
``order`` (the deterministic orders), ``storage`` and ``s3direct`` (local and
object-store reads with retries), ``writer``, ``synthetic``, ``convert``,
``stats``, ``check`` (``sfd-data inspect``), ``reader`` (the loader), ``cli``
(``sfd-data``), ``testing`` (helpers for tests). See docs/data.md.

Nothing is imported here, so that loading the config schema stays light.
"""
