"""embcomp's benchmark harness (ann-benchmarks style).

    python -m bench run bench/sweeps/default.yaml --out results/   # records, CSV, plots
    embcomp sweep --data ../shared/data/wordnet-minilm --out results/
    embcomp recommend --data my_sample.npy --budget-bytes 96 -o best.codec
    python -m bench claims --data shared-wordnet-minilm-384 --out results/

Modules: ``datasets`` (registry ``<source>-<model>-<dim>`` and file loaders, cached
exact ground truth), ``methods`` (embcomp specs, FAISS ``index_factory`` strings and the
RAG-storage paper's procedures behind one interface), ``run`` (sweep YAML -> one JSON
record per run), ``ann`` (frontier codecs served from a FAISS ANN index), ``results``
(CSV + Markdown from records), ``plot`` (PNG + SVG from records), ``recommend`` and
``claims``. FAISS, matplotlib and tqdm load only when a command needs them.
"""
