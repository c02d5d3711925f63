"""The commands: one module each (`convert`, `summarize`, `evaluation`, `train`), each a settings
dataclass (declared with `longsum.settings`), a fat `run(cfg)` and its `COMMAND`, plus `driver`,
the generation loop summarize and eval share. They read the model core (`longsum.model`) and the
data layer (`longsum.data`); nothing below imports them."""
