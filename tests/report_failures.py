"""A pytest plugin for runs that may be cut off (bench/gpu_check.sh on a leased GPU): each
failure's traceback is printed the moment the test fails, not in the summary at the end that a
killed run never reaches (the first H200 call lost every failure that way).
    pytest -p report_failures ...   (tests/ on PYTHONPATH)"""


def pytest_runtest_logreport(report):
    if report.failed:
        text = report.longreprtext
        print(f"\n=== FAILED {report.nodeid} ({report.when})\n{text[-4000:]}\n===", flush=True)
