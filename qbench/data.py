"""Evaluation and calibration text, from the local data root or the Hugging Face hub.

The local layout and reading rules are those of ../shared/data/MANIFEST.md:
- wikitext-2-raw/wiki.test.raw: one row per line; a row whose strip() is empty becomes "" and the
  others keep their trailing "\\n", which gives exactly the hub dataset's `text` rows.
- c4/c4_validation_2k.parquet: documents 0-1099 are for C4 perplexity (joined with a single space,
  GPTQ convention), documents 1100-1999 for calibration, so the two never overlap.
"""

from pathlib import Path

from qbench import ConfigError
from qbench.paths import data_root

WIKITEXT2_TEST = "wikitext-2-raw/wiki.test.raw"
C4_VALIDATION = "c4/c4_validation_2k.parquet"
C4_EVAL_DOCS = range(0, 1100)
C4_CALIB_DOCS = range(1100, 2000)
C4_HUB_VALIDATION = "en/c4-validation.00000-of-00008.json.gz"
C4_HUB_TRAIN = "en/c4-train.00000-of-01024.json.gz"


class DataUnavailable(RuntimeError):
    pass


def _local(root: Path | None, rel: str) -> Path | None:
    if root is None:
        return None
    path = root / rel
    return path if path.is_file() else None


def _unavailable(what: str, local: str, hub: str, root: Path | None, err: Exception) -> DataUnavailable:
    where = f"{root / local}" if root else "no data root set (data_dir= or $QBENCH_DATA_DIR)"
    return DataUnavailable(f"{what} not found locally ({where}) nor on the Hugging Face hub ({hub}): {err}")


def wikitext2_rows(split: str = "test", data_dir: str | None = None) -> list[str]:
    root = data_root(data_dir)
    local = _local(root, WIKITEXT2_TEST) if split == "test" else None
    if local is not None:
        with open(local, encoding="utf-8", newline="") as f:
            lines = f.read().replace("\r\n", "\n").split("\n")
        if lines and lines[-1] == "":
            lines.pop()  # the file ends with a newline: no extra row
        return ["" if not line.strip() else line + "\n" for line in lines]
    try:
        import datasets

        return list(datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"])
    except Exception as err:  # offline, missing package, ...
        raise _unavailable(f"WikiText-2 {split}", WIKITEXT2_TEST, "wikitext/wikitext-2-raw-v1", root, err) from None


def c4_documents(part: str, data_dir: str | None = None) -> list[str]:
    """part='eval': the 1100 perplexity documents; part='calib': calibration documents (disjoint)."""
    root = data_root(data_dir)
    local = _local(root, C4_VALIDATION)
    if local is not None:
        import pandas as pd

        texts = pd.read_parquet(local, columns=["text"])["text"].tolist()
        docs = C4_EVAL_DOCS if part == "eval" else C4_CALIB_DOCS
        return [texts[i] for i in docs]
    try:
        import datasets

        if part == "eval":
            ds = datasets.load_dataset("allenai/c4", data_files={"validation": C4_HUB_VALIDATION}, split="validation")
            return list(ds["text"][: len(C4_EVAL_DOCS)])
        ds = datasets.load_dataset("allenai/c4", data_files={"train": C4_HUB_TRAIN}, split="train")
        return list(ds["text"])
    except Exception as err:
        raise _unavailable(f"C4 ({part})", C4_VALIDATION, "allenai/c4", root, err) from None


def perplexity_text(name: str, data_dir: str | None = None) -> str:
    """The evaluation text of a perplexity dataset, joined as in the GPTQ paper."""
    if name == "wikitext2":
        return "\n\n".join(wikitext2_rows("test", data_dir))
    if name == "c4":
        return " ".join(c4_documents("eval", data_dir))
    raise ConfigError(f"unknown perplexity dataset {name!r}; valid: wikitext2, c4")


LOCAL_FILES = {"wikitext2": WIKITEXT2_TEST, "c4": C4_VALIDATION}  # perplexity set -> its file under the root


def required_files(datasets: list[str], calib: str | None = None, kld: bool = False) -> dict[str, str]:
    """Files under the data root a run reads -> what reads them (perplexity sets, KLD windows, C4 calibration)."""
    need = {LOCAL_FILES[name]: f"eval.ppl.datasets {name}" for name in datasets if name in LOCAL_FILES}
    if kld:
        need.setdefault(WIKITEXT2_TEST, "eval.kld")
    if calib == "c4":
        need.setdefault(C4_VALIDATION, "calib=c4")
    return need


def _shared_data_hint() -> str:
    """' (e.g. QBENCH_DATA_DIR=...)' naming a ../shared/data next to here, where one exists."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[1]):
        candidate = base.parent / "shared" / "data"
        if (candidate / WIKITEXT2_TEST).is_file():
            return f" (e.g. QBENCH_DATA_DIR={candidate})"
    return ""


def check_data(data_dir: str | None, datasets: list[str], calib: str | None = None, kld: bool = False) -> None:
    """Before any model loads: a configured data root holds every file the run reads; without one, the hub
    answers. Either failure is one ConfigError line saying how to fix it."""
    need = required_files(datasets, calib, kld)
    root = data_root(data_dir)
    if not need:
        return
    if root is None:
        from qbench.eval.tasks import network_available  # torch-free; offline variables honoured

        if network_available():
            return
        raise ConfigError("no data root set and the Hugging Face hub is unreachable: set QBENCH_DATA_DIR=<dir> or "
                          f"data_dir=<dir>, a folder holding {', '.join(need)}{_shared_data_hint()}")
    if not root.is_dir():
        raise ConfigError(f"data root {root} (data_dir= or $QBENCH_DATA_DIR) does not exist{_shared_data_hint()}")
    missing = [f"{rel} (for {why})" for rel, why in need.items() if not (root / rel).is_file()]
    if missing:
        raise ConfigError(f"data root {root} lacks {', '.join(missing)}; see the data's MANIFEST.md, "
                          "or unset data_dir and $QBENCH_DATA_DIR to read from the Hugging Face hub")


def perplexity_source(name: str, data_dir: str | None = None) -> str:
    """Where the text of a dataset comes from, for the record."""
    root = data_root(data_dir)
    rel = LOCAL_FILES.get(name, C4_VALIDATION)
    local = _local(root, rel)
    return f"local:{rel}" if local else "hub"
