"""The offline batch compressor: whole corpora, streamed in blocks, locally or on Ray.

>>> from embcomp.batch import compress, sample_vectors            # doctest: +SKIP
>>> train, _ = sample_vectors("shards/", 100_000, column="emb")    # doctest: +SKIP
>>> codec = embcomp.make_codec("pca192,int8").fit(train)           # doctest: +SKIP
>>> print(compress(codec, "shards/", "codes/", column="emb"))      # doctest: +SKIP

Inputs: ``.npy``, ``.fvecs``, Parquet (``fixed_size_list<float>`` or ``list<float>``
column, optional id column), ann-benchmarks HDF5, or a directory of them. Outputs:
Parquet (id + ``code`` fixed-size binary, job record in the file metadata) or
``.npy`` with a JSON sidecar. The Ray engine needs the ``ray`` extra and is imported
only when used.
"""

from .._readers import BadRow, Block, Source, iter_blocks, open_sources
from ._engine import BatchReport, compress, decompress, plan_job
from ._rows import decode_rows, encode_rows
from ._sample import sample_vectors

__all__ = [
    "BadRow",
    "BatchReport",
    "Block",
    "Source",
    "compress",
    "decode_rows",
    "decompress",
    "encode_rows",
    "iter_blocks",
    "open_sources",
    "plan_job",
    "sample_vectors",
]
