"""The fast head lookup agrees with alembic's own view of the migration scripts."""

from __future__ import annotations

from alembic.config import Config
from alembic.script import ScriptDirectory

from records.db import MIGRATIONS, head_revision


def test_head_revision_matches_alembic() -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    assert head_revision() == ScriptDirectory.from_config(config).get_current_head()
