"""The seven HAM10000 diagnostic classes: the one place that names them."""

from __future__ import annotations

# Fixed order: the ClassLabel ids, the model's id2label and every report follow it.
CLASS_CODES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")

LONG_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis / intraepithelial carcinoma",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis-like lesion",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Melanocytic nevus",
    "vasc": "Vascular lesion",
}

# akiec (Bowen's disease / actinic keratosis) counts as malignant or pre-malignant, as in the
# HAM10000 paper's benign/malignant grouping.
MALIGNANT: frozenset[str] = frozenset({"akiec", "bcc", "mel"})

DESCRIPTIONS: dict[str, str] = {
    "akiec": "Rough, scaly sun-damage lesions that can progress to squamous cell carcinoma.",
    "bcc": "The most common skin cancer; grows slowly and rarely spreads, but needs treatment.",
    "bkl": "Harmless growths such as seborrhoeic keratoses, solar lentigines and lichen-planus-like "
    "keratoses.",
    "df": "A firm, harmless nodule of the skin, often on the legs.",
    "mel": "A cancer of pigment cells; the most dangerous common skin cancer, curable when found early.",
    "nv": "A common mole: a harmless cluster of pigment cells.",
    "vasc": "Blood-vessel lesions such as cherry angiomas, angiokeratomas and pyogenic granulomas.",
}


def display_name(code: str) -> str:
    """Return the long name with the code, e.g. "Melanoma (mel)"."""
    return f"{LONG_NAMES[code]} ({code})"


def id2label() -> dict[int, str]:
    """Return the model config's id -> class code mapping."""
    return dict(enumerate(CLASS_CODES))


def label2id() -> dict[str, int]:
    """Return the model config's class code -> id mapping."""
    return {code: i for i, code in enumerate(CLASS_CODES)}
