"""Models of the scaled workers' processor state (design rule 6: "state sits behind a port").

`streams/pgstate.py` reads and writes these tables; migration 0003 creates them. Kept apart from
`records.models` so these tables have one home. Alembic and the "models match the migrations" test must see
them in `Base.metadata`: `records/migrations/env.py` should import this module (as it does
`records.staff_models`); until it does, migration 0003 imports it.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column

from records.models import Base


class ProcessorState(Base):
    """One key's state of one processor (`namespace` = the processor's name), as the processor encoded it."""

    __tablename__ = "processor_state"

    namespace: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)


class ProcessorOffset(Base):
    """The last source offset whose effects and state are applied, per (group, topic, partition)."""

    __tablename__ = "processor_offsets"

    group: Mapped[str] = mapped_column(String(64), primary_key=True)
    topic: Mapped[str] = mapped_column(String(255), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    offset: Mapped[int] = mapped_column(BigInteger)
