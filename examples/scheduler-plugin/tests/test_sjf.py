"""How a plugin tests itself: tandem's conformance kit, plus its own behaviour."""

from tandem_sjf import ShortestJobFirst

from tandem.schedulers import load_scheduler
from tandem.schedulers.testing import check_scheduler


def test_conformance() -> None:
    report = check_scheduler(lambda: ShortestJobFirst(aging=4.0), max_examples=40)
    assert report.requests > 0


def test_found_by_name() -> None:
    assert isinstance(load_scheduler("sjf", {"aging": "2.5"}), ShortestJobFirst)
