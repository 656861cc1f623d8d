"""The connection cap stays below the file descriptor limit, which the gateway first raises."""

from __future__ import annotations

import resource
import subprocess
import sys

from services.gateway.connections import FD_RESERVE, connection_cap
from tests.cluster import ROOT


def test_the_cap_is_the_setting_when_descriptors_are_plenty():
    assert connection_cap(2048, 1 << 20) == 2048


def test_the_cap_leaves_descriptors_for_the_rest_of_the_process():
    assert connection_cap(2048, 1024) == 1024 - FD_RESERVE
    assert connection_cap(2048, FD_RESERVE) == 1  # one connection, rather than none


def test_the_soft_descriptor_limit_is_raised_to_the_hard_one():
    # In a child process: this one's limits stay as they are.
    code = ("import resource; from services.gateway.connections import raise_fd_limit; "
            "print(raise_fd_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    out = subprocess.run(["sh", "-c", f"ulimit -Sn 200 && exec {sys.executable} -c '{code}'"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    returned, soft, hard = map(int, out)
    assert returned == soft and (soft == hard or hard == resource.RLIM_INFINITY)  # macOS: as far as allowed
