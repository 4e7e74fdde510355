"""The comparison tables, regenerated from the run records as Markdown, CSV and LaTeX.

    python -m analysis.tables --results results/quickstart --out results/quickstart/tables

Eight tables (pandas; the Markdown and LaTeX writers are here, a few lines each, so that
the output depends on no optional package and is byte-for-byte stable):

1. ``main``: one row per method configuration: storage, peak training memory,
   throughput, trainable parameters, MMLU 0/5-shot (overall and per category),
   perplexity; mean ± the half-width of its 95% t-interval over seeds, and the number of seeds.
2. ``qlora_table4``: the QLoRA paper's Table 4 layout (data type x model x fine-tuning
   data, mean 5-shot MMLU).
3. ``qalora_table1``: the QA-LoRA paper's Table 1 layout (method x bits, MMLU 0/5-shot
   per category and average).
4. ``datatype_perplexity``: quantization data type x held-out perplexity without
   fine-tuning, in the spirit of the QLoRA paper's Table 2.
5. ``datatype_fidelity``: each storage format of the base without fine-tuning (the
   methods' own and the 16-bit base's exports, GGUF) against the 16-bit base: bits/param,
   KL divergence of next-token distributions, top-token agreement, perplexity.
6. ``deploy_fidelity``: method x export format after fine-tuning: bits/param, file size,
   perplexity, KL divergence and top-token agreement against the fine-tuned model before
   export and against the 16-bit base, MMLU.
7. ``gguf_readers``: each GGUF export as transformers reads it and as llama.cpp runs it.
8. ``methods``: every method side by side, by its base format and adapter: storage, trainable
   parameters, throughput, training loss first -> last, perplexity, MMLU and the KL divergence
   against the 16-bit base (the README's all-methods table).

Published numbers come from ``analysis/reference/published.csv`` and are shown as rows
marked with their paper and table. "—" is a cell with no run (or a published value we
did not verify); "oom"/"failed" is a cell whose only runs ended so. Accuracies are in %.

A cell averages runs that differ in nothing but the seed: the same ``config_id`` of
``analysis.load`` (everything in the resolved config that can change a result, the model
named by what was loaded), apart from the shots where a table spreads them over columns.
Configurations that a table's labels do not tell apart (two learning rates, say) get rows
of their own and a Settings column naming what differs. A cell whose runs come from more
than one code version (git commit, or uncommitted changes) or device is marked ‡.
"""
