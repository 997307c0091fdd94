"""The browser tests share one server and browser (tests/e2e/conftest.py): under pytest-xdist they must all
go to one worker, which `--dist loadgroup` does for tests of one `xdist_group`."""

import pytest

pytestmark = [pytest.mark.e2e]


def test_every_test_here_is_in_the_e2e_group_of_one_worker(request):
    here = [item for item in request.session.items if "tests/e2e/" in item.nodeid]
    assert request.node in here and len(here) > 1
    groups = {item.nodeid: [m.args for m in item.iter_markers("xdist_group")] for item in here}
    assert all(g == [("e2e",)] for g in groups.values()), groups
    assert not any(item.get_closest_marker("xdist_group") for item in request.session.items if item not in here)
