"""The model core: `checkpoint` (resolve a name once, load the model and tokenizer: `load_model`),
`lsg/` (LSG attention and the LSG model families), `longt5` (LongT5's encoder attention),
`decoding` (generate() with the beams' cross-attention shared), `cpu` (which CPU kernels decode
fastest, measured once per CPU model), `int8` (`--dtype int8`'s linear layers), `generation` (batched summaries
of many documents, memory bounded by a window) and `tiny` (tiny models built in code). It reads
`longsum.registry`, never the commands."""
