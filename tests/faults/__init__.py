"""Fault injection (issue 18): training runs killed at random moments and resumed bit-identically, stopped
by SIGTERM, a torchrun rank killed, full disks and unwritable folders, and property-based bad inputs. The
machinery lives in `harness` (and the child process in `driver`); `benchmarks/reliability.py` reuses it."""
