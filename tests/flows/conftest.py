"""Flow tests get their own Prefect home, database and result storage for the test session."""
import pytest


@pytest.fixture(scope="session")
def prefect_env(tmp_path_factory):
    from prefect.settings import PREFECT_HOME, PREFECT_LOCAL_STORAGE_PATH, temporary_settings
    from prefect.testing.utilities import prefect_test_harness

    home = tmp_path_factory.mktemp("prefect-home")
    with temporary_settings({PREFECT_HOME: str(home), PREFECT_LOCAL_STORAGE_PATH: str(home / "storage")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield home
