import os

import fastloss


def test_openmp_enabled_unless_disabled():
    # A build that silently lost OpenMP would run every kernel on one thread.
    # FASTLOSS_NO_OPENMP=1 is the only way to ask for such a build.
    if os.environ.get("FASTLOSS_NO_OPENMP", "0") not in ("", "0"):
        assert not fastloss.openmp_enabled()
    else:
        assert fastloss.openmp_enabled()


def test_version_is_a_string():
    assert isinstance(fastloss.__version__, str)
    assert fastloss.__version__.count(".") >= 2
