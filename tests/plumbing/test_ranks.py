import os
import signal
import socket
import subprocess
import sys

from litplug.plumbing import ended_ranks, rank_processes


def test_ended_ranks_names_the_ranks_whose_process_ended_on_this_machine():
    host = socket.gethostname()
    procs = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    roster = [rank_processes()[0], (host, procs[0].pid), (host, procs[1].pid), ("elsewhere", procs[0].pid)]
    try:
        assert ended_ranks(roster, wait=0) == []  # all running
        os.kill(procs[0].pid, signal.SIGKILL)
        # Not waited for yet (what a launcher's parent sees): the signal is named.
        assert ended_ranks(roster, wait=5) == [f"rank 1 (pid {procs[0].pid}) ended by signal SIGKILL"]
        procs[0].wait()
        assert ended_ranks(roster, wait=0) == [f"rank 1 (pid {procs[0].pid}) has ended"]  # gone
    finally:
        for p in procs:
            p.kill()
            p.wait()
