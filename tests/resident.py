"""The process's resident set size, for the tests that check memory stays flat over many
calls (Linux: /proc/self/status)."""


def resident_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")
