"""`podserve features load FILE --set NAME`: bulk-load feature vectors with COPY.

CSV needs nothing extra; Parquet needs pyarrow (`pip install 'podserve[parquet]'`). The
whole file is loaded in one transaction (readers see the old or the new set, never half),
through a staging table: COPY in, then upsert (the last row of an entity id wins).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

Record = tuple[str, list[float]]

_STAGE = (
    "CREATE TEMP TABLE podserve_features_stage "
    '(seq bigserial, entity_id text NOT NULL, "values" real[] NOT NULL) ON COMMIT DROP'
)
_UPSERT = """
INSERT INTO podserve_features AS f (feature_set, entity_id, "values", updated_at)
SELECT DISTINCT ON (entity_id) $1, entity_id, "values", now()
FROM podserve_features_stage ORDER BY entity_id, seq DESC
ON CONFLICT (feature_set, entity_id)
DO UPDATE SET "values" = EXCLUDED."values", updated_at = EXCLUDED.updated_at
"""
_SET = """
INSERT INTO podserve_feature_sets (name, columns, updated_at) VALUES ($1, $2, now())
ON CONFLICT (name) DO UPDATE SET columns = EXCLUDED.columns, updated_at = now()
"""


FLOAT32_MAX = 3.4028234663852886e38


class FeatureFileError(ValueError):
    pass


@dataclass
class FeatureFile:
    columns: list[str]  # value columns, in vector order
    batches: Iterator[list[Record]]


def open_feature_file(path: Path, id_column: str | None, batch_rows: int) -> FeatureFile:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _open_csv(path, id_column, batch_rows)
    if suffix in (".parquet", ".pq"):
        return _open_parquet(path, id_column, batch_rows)
    raise FeatureFileError(f"{path}: unsupported file type {suffix!r}; use .csv or .parquet")


def _pick_id(header: list[str], id_column: str | None, path: Path) -> int:
    wanted = id_column or ("entity_id" if "entity_id" in header else header[0])
    if wanted not in header:
        raise FeatureFileError(f"{path}: no column {wanted!r}; columns are {header}")
    return header.index(wanted)


def _not_utf8(path: Path, exc: UnicodeDecodeError) -> FeatureFileError:
    return FeatureFileError(f"{path}: not UTF-8 text ({exc.reason} in a byte near {exc.start})")


def _open_csv(path: Path, id_column: str | None, batch_rows: int) -> FeatureFile:
    handle = path.open(newline="", encoding="utf-8")
    reader = csv.reader(handle)
    try:
        header = next(reader, None)
    except UnicodeDecodeError as exc:
        handle.close()
        raise _not_utf8(path, exc) from None
    if not header or len(header) < 2:
        handle.close()
        raise FeatureFileError(f"{path}: needs a header with an id column and value columns")
    id_index = _pick_id(header, id_column, path)
    columns = [name for i, name in enumerate(header) if i != id_index]

    def batches() -> Iterator[list[Record]]:
        with handle:
            batch: list[Record] = []
            try:
                for line_no, row in enumerate(reader, start=2):
                    batch.append(_csv_record(row, id_index, len(header), path, line_no))
                    if len(batch) >= batch_rows:
                        yield batch
                        batch = []
            except UnicodeDecodeError as exc:
                raise _not_utf8(path, exc) from None
            if batch:
                yield batch

    return FeatureFile(columns, batches())


def _csv_record(row: list[str], id_index: int, width: int, path: Path, line: int) -> Record:
    if len(row) != width:
        raise FeatureFileError(f"{path}:{line}: {len(row)} fields, header has {width}")
    entity = row[id_index]
    if not entity:
        raise FeatureFileError(f"{path}:{line}: empty entity id")
    if "\x00" in entity:  # PostgreSQL text cannot hold it
        raise FeatureFileError(f"{path}:{line}: entity id holds the character U+0000")
    try:
        values = [float(v) for i, v in enumerate(row) if i != id_index]
    except ValueError as exc:
        raise FeatureFileError(f"{path}:{line}: {exc}") from None
    if not all(math.isfinite(v) for v in values):
        raise FeatureFileError(f"{path}:{line}: NaN or Inf value")
    if not all(abs(v) <= FLOAT32_MAX for v in values):  # the column is real[] (float32)
        raise FeatureFileError(
            f"{path}:{line}: a value beyond the float32 range (±{FLOAT32_MAX:g})"
        )
    return entity, values


def _open_parquet(path: Path, id_column: str | None, batch_rows: int) -> FeatureFile:
    try:
        import numpy as np
        import pyarrow.parquet as pq
    except ImportError:
        raise FeatureFileError(
            "reading Parquet needs pyarrow: pip install 'podserve[parquet]' (or use CSV)"
        ) from None
    try:
        parquet = pq.ParquetFile(path)
    except ValueError as exc:  # pyarrow's ArrowInvalid: not a Parquet file
        raise FeatureFileError(f"{path}: not a readable Parquet file ({exc})") from None
    header = list(parquet.schema_arrow.names)
    id_index = _pick_id(header, id_column, path)
    id_name = header[id_index]
    columns = [name for name in header if name != id_name]

    def batches() -> Iterator[list[Record]]:
        for batch in parquet.iter_batches(batch_size=batch_rows):
            raw_ids = batch.column(id_name).to_pylist()
            if any(v is None or v == "" for v in raw_ids):
                raise FeatureFileError(f"{path}: empty or missing entity ids in {id_name!r}")
            ids = [str(v) for v in raw_ids]
            if any("\x00" in i for i in ids):
                raise FeatureFileError(f"{path}: an entity id holds the character U+0000")
            try:
                matrix = np.column_stack(
                    [batch.column(name).to_numpy(zero_copy_only=False) for name in columns]
                ).astype(np.float32)
            except (TypeError, ValueError) as exc:  # e.g. a column of strings
                raise FeatureFileError(f"{path}: value columns must be numeric ({exc})") from None
            if not np.isfinite(matrix).all():
                raise FeatureFileError(f"{path}: NaN, Inf or missing values")
            yield list(zip(ids, matrix.tolist(), strict=True))

    return FeatureFile(columns, batches())


@dataclass(frozen=True)
class LoadResult:
    rows_read: int
    entities_stored: int  # fewer where ids repeat: the last row of an id is the one kept


async def load_features(
    conn: asyncpg.Connection, feature_set: str, file: FeatureFile, replace: bool = False
) -> LoadResult:
    """Load every row in one transaction."""
    total = 0
    async with conn.transaction():
        await conn.execute(_STAGE)
        for batch in file.batches:
            await conn.copy_records_to_table(
                "podserve_features_stage", records=batch, columns=["entity_id", "values"]
            )
            total += len(batch)
        if replace:
            await conn.execute("DELETE FROM podserve_features WHERE feature_set = $1", feature_set)
        status = await conn.execute(_UPSERT, feature_set)  # "INSERT 0 <rows>"
        await conn.execute(_SET, feature_set, file.columns)
    return LoadResult(total, int(status.split()[-1]))
