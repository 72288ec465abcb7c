import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    """48 generated 32-pixel images in imagefolder layout (captions and labels in metadata.jsonl)."""
    from common.demo_data import make_demo_images

    return make_demo_images(tmp_path_factory.mktemp("images"), num_images=48, size=32, seed=0)


def pytest_collection_finish(session):
    """Runs of the scripts ahead: start the fork server, so that it imports while the first tests run."""
    import helpers

    if any(getattr(item.module, name, None) in (helpers.run, helpers.start) for item in session.items
           for name in ("run", "start") if hasattr(item, "module")):
        helpers.warm_up()
