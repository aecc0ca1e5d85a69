"""The virt driver of the tools/cloud --real computes.

nova's fake driver with a stable node identity, whose spawn waits while
the file named by CLOUD_SLOW_SPAWN exists, so that a compute can be
killed in the middle of a build.
"""

import os
import time

from nova.virt import fake


class SlowFakeDriver(fake.FakeDriverWithoutFakeNodes):

    def spawn(self, *args, **kwargs):
        flag = os.environ.get('CLOUD_SLOW_SPAWN')
        deadline = time.monotonic() + 60
        while flag and os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.2)
        return super().spawn(*args, **kwargs)
