"""Planning a job before it queues: memory per device, step time, data bandwidth and a verdict.

``sfd-launch plan`` prints a plan; ``sfd-launch slurm|ascend|local`` plan first when
``launcher.device`` is known and refuse a job that cannot fit. The modules:

* :mod:`.devices`  -- the device table (memory, and the cluster behind the step time);
* :mod:`.memory`   -- one training step traced on fake tensors and a fake process group;
* :mod:`.scaling`  -- the scaling model's formulas (bytes per collective, step time);
* :mod:`.data`     -- bytes the loader reads per image;
* :mod:`.host`     -- host memory per rank at start-up;
* :mod:`.plan`     -- all of it for one job, the verdict and the report.

Importing this package imports no torch (the launcher's config validation reads :mod:`.devices`).
"""

from sfd_train.planning.devices import DEVICES, DeviceSpec, resolve_device

__all__ = ["DEVICES", "DeviceSpec", "resolve_device"]
