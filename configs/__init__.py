"""famjax training configs (ml-collections). `configs/base.py` documents every field; run one with
`python -m famjax.train --config=configs/<file>.py[:variant] --workdir=DIR [--config.key=value ...]`."""
