"""Blocks between the pipeline's stages, sealed: one row holding the table as Arrow IPC bytes. Ray Data splits
and concatenates the tables it carries, and a sealed block is one opaque value to it; the stages open it (see
imgxlate/infer/stages.py and DESIGN.md)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

SEALED = pa.schema([pa.field("block", pa.large_binary())])


def seal(table: pa.Table, compression: str | None = None) -> pa.Table:
    """``table`` as one row of Arrow IPC bytes (``compression``: e.g. 'zstd', for the plan's input blocks, which
    the driver holds while they are in flight: a row of names takes ~55 bytes instead of ~350)."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema, options=pa.ipc.IpcWriteOptions(compression=compression)) as w:
        w.write_table(table)
    data = sink.getvalue()
    if compression:             # a block that is kept: the stream's buffer has up to twice the capacity it needs
        data = pa.py_buffer(data.to_pybytes())
    offsets = pa.py_buffer(np.array([0, data.size], np.int64).tobytes())
    return pa.Table.from_arrays([pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data])], schema=SEALED)


def unseal(sealed: pa.Table) -> pa.Table:
    """The table(s) in sealed rows, as one table (zero-copy from the IPC bytes unless they are compressed)."""
    tables = [pa.ipc.open_stream(v.as_buffer()).read_all() for v in sealed.column("block")]
    if not tables:
        raise ValueError("no sealed block in an empty table")
    return tables[0] if len(tables) == 1 else pa.concat_tables(tables)


def sealed(fn):
    """A stage function that takes and returns sealed blocks."""
    def call(block: pa.Table, **kw) -> pa.Table:
        return seal(fn(unseal(block), **kw))
    call.__name__ = fn.__name__
    return call
