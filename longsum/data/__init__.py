"""Data in and results out: `inputs` (summarize's documents, streamed), `datasets` (eval's and
train's datasets), `text` (sentence splitting), `metrics` (ROUGE), `store` (result files that
resume), `distributed` (ranks and their part files), `schema` (the records' and results' types)
and `provenance` (versions, git commit). No model code here."""
