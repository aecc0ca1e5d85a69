"""nova-conductor for tools/chaos, with the kill points of chaos_points.py.

The same service as nova's nova-conductor, whose flow stages die at the
point tools/chaos arms.
"""

import os
import sys

from nova.cmd import conductor  # first: nova's eventlet monkey patching

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import chaos_points  # noqa: E402

if __name__ == '__main__':
    chaos_points.install_conductor()
    sys.exit(conductor.main())
