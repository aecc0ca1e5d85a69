"""nova-compute for tools/cloud --real, with the driver of cloud_driver.py.

nova loads compute drivers from nova.virt only: the driver module is made
available there before nova-compute's own main() runs. Under tools/chaos
(CHAOS_DIR set) the host build's kill points are installed too
(chaos_points.py).
"""

import os
import sys

from nova.cmd import compute  # first: nova's eventlet monkey patching

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos_points  # noqa: E402
import cloud_driver  # noqa: E402

sys.modules['nova.virt.cloud_driver'] = cloud_driver

if __name__ == '__main__':
    if chaos_points.DIR:
        chaos_points.install_compute()
    sys.exit(compute.main())
