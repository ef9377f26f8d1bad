"""QIDO-RS searches answered from the store's index: the attributes it keeps, matches and returns (PS3.18 10.6)."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataset import Dataset

if TYPE_CHECKING:
    import sqlite3

logger = logging.getLogger(__name__)

# Attributes returned by QIDO-RS per level (PS3.18 table 10.6.3-3, plus what OHIF shows).
STUDY_TAGS = (
    "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName", "PatientName",
    "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDescription",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "InstitutionName",
)
SERIES_TAGS = (
    "Modality", "SeriesDescription", "SeriesNumber", "SeriesInstanceUID", "NumberOfSeriesRelatedInstances",
    "SeriesDate", "SeriesTime", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "BodyPartExamined",
)
INSTANCE_TAGS = (
    "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
    "AvailableTransferSyntaxUID",
)

#: Attributes the index holds as columns (UIDs, counts, the instance attributes) rather than in the kept header JSON.
_FROM_COLUMNS = frozenset({
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality", "ModalitiesInStudy",
    "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "NumberOfSeriesRelatedInstances",
    "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames", "AvailableTransferSyntaxUID",
})
#: Header attributes kept (as DICOM JSON) per study and per series, read from one instance when indexed.
STUDY_KEPT = tuple(kw for kw in STUDY_TAGS if kw not in _FROM_COLUMNS)
SERIES_KEPT = tuple(kw for kw in SERIES_TAGS if kw not in _FROM_COLUMNS)
_STUDY_KEPT_TAGS = frozenset(int(tag_for_keyword(kw)) for kw in STUDY_KEPT)  # type: ignore[arg-type]
_SERIES_KEPT_TAGS = frozenset(int(tag_for_keyword(kw)) for kw in SERIES_KEPT)  # type: ignore[arg-type]
_KEPT_TAGS = sorted(_STUDY_KEPT_TAGS | _SERIES_KEPT_TAGS)
_MODALITY = 0x00080060
#: (keyword, JSON key, VR) of the kept attributes, for :meth:`IndexedAttributes.from_raw`.
_KEPT_FIELDS = tuple((keyword_for_tag(t), f"{t:08X}", dictionary_VR(t)) for t in _KEPT_TAGS)
_FAST_ENCODINGS = {"": "latin_1", "ISO_IR 6": "latin_1", "ISO 2022 IR 6": "latin_1", "ISO_IR 100": "latin_1",
                   "ISO_IR 192": "utf_8"}
_INTEGER = re.compile(r" *[+-]?[0-9]+ *")
#: What is read of a file to fill the index (:meth:`IndexedAttributes.from_file`).
HEADER_KEYWORDS = ("SpecificCharacterSet",) + STUDY_KEPT + SERIES_KEPT

_STUDY_COLUMNS = {  # study column -> keyword (text as matched; PN folded)
    "patient_name_key": "PatientName", "patient_id": "PatientID", "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex", "study_time": "StudyTime", "accession_number": "AccessionNumber",
    "referring_physician_key": "ReferringPhysicianName", "study_id": "StudyID",
}
_SERIES_COLUMNS = {"pps_start_date": "PerformedProcedureStepStartDate",
                   "pps_start_time": "PerformedProcedureStepStartTime"}
STUDY_COLUMNS = tuple(_STUDY_COLUMNS)
SERIES_COLUMNS = tuple(_SERIES_COLUMNS)


@dataclass(frozen=True)
class IndexedAttributes:
    """What the index keeps of a series' first instance: kept attributes as DICOM JSON, and matching columns.

    ``study_json``/``series_json`` are JSON objects (PS3.18 F.2) of :data:`STUDY_KEPT` / :data:`SERIES_KEPT`;
    ``study_columns``/``series_columns`` the values of :data:`STUDY_COLUMNS` / :data:`SERIES_COLUMNS` as they
    are matched (person names case-folded).
    """

    study_json: str = "{}"
    series_json: str = "{}"
    study_columns: dict[str, str] = field(default_factory=dict)
    series_columns: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> IndexedAttributes:
        """Take the kept attributes and matching values of ``ds`` (elements that cannot be decoded are left out)."""
        data = _json_subset(ds)
        study = {k: v for k, v in data.items() if int(k, 16) in _STUDY_KEPT_TAGS}
        series = {k: v for k, v in data.items() if int(k, 16) in _SERIES_KEPT_TAGS}
        return cls(
            study_json=_dumps(study), series_json=_dumps(series),
            study_columns={col: _match_text(ds, kw) for col, kw in _STUDY_COLUMNS.items()},
            series_columns={col: _match_text(ds, kw) for col, kw in _SERIES_COLUMNS.items()},
        )

    @classmethod
    def from_raw(cls, values: Mapping[str, bytes]) -> IndexedAttributes | None:
        """The same as :meth:`from_dataset`, from the raw values :func:`dicom_io.store.check_encoding` found
        (keyword -> bytes), without pydicom; None when a value needs pydicom's conversion (a character set other
        than the default, Latin-1 or UTF-8, several values, a name with ideographic or phonetic groups, an IS
        that is not an integer). ``tests/dicomweb/test_qido_index.py`` checks that both give the same."""
        charset = values.get("SpecificCharacterSet", b"").decode("ascii", "replace").strip(" \x00")
        encoding = _FAST_ENCODINGS.get(charset)
        if encoding is None:
            return None
        data: dict[str, Any] = {}
        texts: dict[str, str] = {}
        for kw, key, vr in _KEPT_FIELDS:
            raw = values.get(kw)
            if raw is None:
                continue
            try:
                text = raw.decode(encoding if vr in ("PN", "SH", "LO") else "ascii").rstrip("\x00 ")
            except UnicodeDecodeError:
                return None
            if "\\" in text:
                return None
            texts[kw] = text
            if not text:
                data[key] = {"vr": vr}
            elif vr == "PN":
                if "=" in text or text[0] == " ":
                    return None
                data[key] = {"vr": vr, "Value": [{"Alphabetic": text}]}
            elif vr == "IS":
                if not _INTEGER.fullmatch(text):
                    return None
                data[key] = {"vr": vr, "Value": [int(text)]}
            else:
                data[key] = {"vr": vr, "Value": [text]}

        def column(kw: str) -> str:
            text = texts.get(kw, "")
            return (text.casefold() if dictionary_VR(kw) == "PN" else text)[:256]

        return cls(
            study_json=_dumps({k: v for k, v in data.items() if int(k, 16) in _STUDY_KEPT_TAGS}),
            series_json=_dumps({k: v for k, v in data.items() if int(k, 16) in _SERIES_KEPT_TAGS}),
            study_columns={col: column(kw) for col, kw in _STUDY_COLUMNS.items()},
            series_columns={col: column(kw) for col, kw in _SERIES_COLUMNS.items()},
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> IndexedAttributes:
        """Read the kept attributes of a stored file (its header only).

        Raises
        ------
        OSError
            When the file cannot be read.
        ValueError
            When it is not a DICOM file pydicom can parse.
        """
        try:
            ds = dcmread(os.fspath(path), stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS))
        except OSError:
            raise
        except Exception as exc:  # pydicom raises many types for broken data
            raise ValueError(f"File '{path}' cannot be parsed: {type(exc).__name__}") from exc
        return cls.from_dataset(ds)


def _json_subset(ds: Dataset) -> dict[str, Any]:
    """The kept attributes of ``ds`` as DICOM JSON (elements that cannot be converted are left out)."""
    sub = Dataset()
    for tag in _KEPT_TAGS:
        if tag in ds:
            try:
                sub.add(ds[tag])
            except Exception:  # an element pydicom cannot convert
                continue
    try:
        return sub.to_json_dict(bulk_data_threshold=1 << 30, suppress_invalid_tags=True)
    except Exception:
        return {}


def _match_text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    if value is None or value == "":
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        text = "\\".join(str(v) for v in value)
    else:
        text = str(value)
    if dictionary_VR(keyword) == "PN":
        text = text.casefold()
    return text[:256]


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


# --- matching -----------------------------------------------------------------------------------


class Level(Enum):
    """The QIDO-RS query levels (PS3.18 10.6.1)."""

    STUDY = 0
    SERIES = 1
    INSTANCE = 2


@dataclass(frozen=True)
class _Key:
    level: Level
    column: str
    kind: str  # uid, text, pn, cs, date, time, int, modalities


#: Matching keys answered by the index (the others fall back to the stored header; see docs/dicomweb.md).
MATCHING_KEYS: dict[str, _Key] = {
    "StudyInstanceUID": _Key(Level.STUDY, "st.study_instance_uid", "uid"),
    "PatientName": _Key(Level.STUDY, "st.patient_name_key", "pn"),
    "PatientID": _Key(Level.STUDY, "st.patient_id", "text"),
    "PatientBirthDate": _Key(Level.STUDY, "st.patient_birth_date", "date"),
    "PatientSex": _Key(Level.STUDY, "st.patient_sex", "cs"),
    "StudyDate": _Key(Level.STUDY, "st.study_date", "date"),
    "StudyTime": _Key(Level.STUDY, "st.study_time", "time"),
    "AccessionNumber": _Key(Level.STUDY, "st.accession_number", "text"),
    "ReferringPhysicianName": _Key(Level.STUDY, "st.referring_physician_key", "pn"),
    "StudyID": _Key(Level.STUDY, "st.study_id", "text"),
    "StudyDescription": _Key(Level.STUDY, "st.study_description", "text"),
    "ModalitiesInStudy": _Key(Level.STUDY, "st.study_instance_uid", "modalities"),
    "NumberOfStudyRelatedSeries": _Key(Level.STUDY, "st.num_series", "int"),
    "NumberOfStudyRelatedInstances": _Key(Level.STUDY, "st.num_instances", "int"),
    "SeriesInstanceUID": _Key(Level.SERIES, "se.series_instance_uid", "uid"),
    "Modality": _Key(Level.SERIES, "se.modality", "cs"),
    "SeriesNumber": _Key(Level.SERIES, "se.series_number", "int"),
    "SeriesDescription": _Key(Level.SERIES, "se.series_description", "text"),
    "PerformedProcedureStepStartDate": _Key(Level.SERIES, "se.pps_start_date", "date"),
    "PerformedProcedureStepStartTime": _Key(Level.SERIES, "se.pps_start_time", "time"),
    "NumberOfSeriesRelatedInstances": _Key(Level.SERIES, "se.num_instances", "int"),
    "SOPInstanceUID": _Key(Level.INSTANCE, "i.sop_instance_uid", "uid"),
    "SOPClassUID": _Key(Level.INSTANCE, "i.sop_class_uid", "uid"),
    "InstanceNumber": _Key(Level.INSTANCE, "i.instance_number", "int"),
}

_PAGING = {"limit", "offset", "includefield", "fuzzymatching"}
_SPLIT = re.compile(r"[,\\]")
FUZZY_WARNING = '299 ainode: "The fuzzymatching parameter is not supported. Only literal matching has been performed."'
MORE_WARNING = '299 ainode: "There are additional results that can be requested"'


def attribute_tag(key: str) -> int | None:
    """The tag a QIDO-RS key names (keyword or 8 hex digits), or None."""
    key = key.strip()
    if len(key) == 8 and all(c in "0123456789abcdefABCDEF" for c in key):
        return int(key, 16)
    tag = tag_for_keyword(key)
    return int(tag) if tag is not None else None


@dataclass
class Search:
    """A parsed QIDO-RS request (:func:`parse_search`)."""

    level: Level
    filters: list[tuple[int, str]] = field(default_factory=list)
    include: set[int] = field(default_factory=set)
    include_all: bool = False
    limit: int | None = None
    offset: int = 0
    fuzzy: bool = False
    study_uid: str | None = None
    series_uid: str | None = None


def parse_search(level: Level, params: Iterable[tuple[str, str]], *, study_uid: str | None = None,
                 series_uid: str | None = None) -> Search:
    """Parse QIDO-RS query parameters (PS3.18 8.3.4): matching keys, ``includefield``, ``limit``/``offset``,
    ``fuzzymatching``.

    Raises
    ------
    ValueError
        When a key or an includefield is not a known attribute, or limit/offset are not non-negative integers.
    """
    search = Search(level, study_uid=study_uid, series_uid=series_uid)
    items = list(params)
    for key, value in items:
        low = key.lower()
        if low == "includefield":
            for part in value.split(","):
                if part.strip().lower() == "all":
                    search.include_all = True
                elif part.strip():
                    tag = attribute_tag(part)
                    if tag is None:
                        raise ValueError(f'includefield "{part}" is not a known attribute.')
                    search.include.add(tag)
        elif low == "fuzzymatching":
            search.fuzzy = value.strip().lower() == "true"
        elif low not in _PAGING:
            tag = attribute_tag(key)
            if tag is None:
                raise ValueError(f'Query key "{key}" is not a known attribute.')
            search.filters.append((tag, value))
    values = {k.lower(): v for k, v in items}
    try:
        search.limit = int(values["limit"]) if "limit" in values else None
        search.offset = int(values.get("offset", "0") or 0)
        if (search.limit is not None and search.limit < 0) or search.offset < 0:
            raise ValueError
    except ValueError:
        raise ValueError("limit and offset must be non-negative integers.") from None
    return search


def _glob(pattern: str) -> str:
    """A DICOM wildcard pattern (``*``, ``?``) as an SQLite GLOB pattern (``[`` taken literally)."""
    return pattern.replace("[", "[[]")


def _string_condition(column: str, value: str, fold: bool) -> tuple[str, list[Any]]:
    if fold:
        value = value.casefold()
    if "*" in value or "?" in value:
        return f"{column} GLOB ?", [_glob(value)]
    return f"{column} = ?", [value]


def _condition(key: _Key, value: str) -> tuple[str, list[Any]] | None:
    """SQL for one matching key (PS3.4 C.2.2.2); None for universal matching."""
    value = value.strip()
    if value == "" or (value.replace("*", "") == "" and key.kind in ("text", "pn", "cs", "modalities")):
        return None  # universal matching ("*" alone is equivalent, PS3.4 C.2.2.2.4)
    col, kind = key.column, key.kind
    if kind == "uid":
        uids = [u.strip() for u in _SPLIT.split(value) if u.strip()]
        return f"{col} IN ({','.join('?' * len(uids))})", list(uids)
    if kind in ("text", "pn"):
        return _string_condition(col, value, kind == "pn")
    if kind in ("cs", "modalities"):
        target = "mx.modality" if kind == "modalities" else col
        alts = [_string_condition(target, a.strip(), False) for a in _SPLIT.split(value) if a.strip()]
        sql = "(" + " OR ".join(s for s, _ in alts) + ")"
        args = [a for _, arg in alts for a in arg]
        if kind == "modalities":
            sql = f"EXISTS (SELECT 1 FROM series mx WHERE mx.study_instance_uid = st.study_instance_uid AND {sql})"
        return sql, args
    if kind in ("date", "time"):
        if "-" in value:
            lo, _, hi = value.partition("-")
            parts, args = [f"{col} != ''"], []
            if lo.strip():
                parts.append(f"{col} >= ?")
                args.append(lo.strip())
            if hi.strip():
                parts.append(f"{col} <= ?")
                args.append(hi.strip())
            return " AND ".join(parts), args
        return f"{col} = ?", [value]
    try:
        number = int(value)
    except ValueError:
        return "0", []  # an integer attribute never equals a non-integer
    return f"{col} = ?", [number]


_SELECT = {
    Level.STUDY: "st.study_instance_uid, st.attrs AS study_attrs, st.num_series, st.num_instances AS study_instances, "
                 "st.modalities",
    Level.SERIES: "st.study_instance_uid, st.attrs AS study_attrs, se.series_instance_uid, se.attrs AS series_attrs, "
                  "se.num_instances AS series_instances, se.modality",
    Level.INSTANCE: "st.study_instance_uid, st.attrs AS study_attrs, se.series_instance_uid, se.attrs AS series_attrs, "
                    "se.modality, i.sop_instance_uid, i.sop_class_uid, i.instance_number, i.transfer_syntax_uid, "
                    "i.pixel_rows, i.pixel_columns, i.bits_allocated, i.number_of_frames, i.header_indexed, i.path",
}
_FROM = {
    Level.STUDY: "studies st",
    Level.SERIES: "series se JOIN studies st ON st.study_instance_uid = se.study_instance_uid",
    Level.INSTANCE: "instances i JOIN series se ON se.series_instance_uid = i.series_instance_uid "
                    "JOIN studies st ON st.study_instance_uid = se.study_instance_uid",
}
_ORDER = {
    Level.STUDY: "st.last_received DESC, st.study_instance_uid DESC",
    Level.SERIES: "se.last_received DESC, se.series_instance_uid DESC",
    Level.INSTANCE: "se.last_received DESC, se.series_instance_uid DESC, i.instance_number, i.sop_instance_uid",
}
#: The instance whose header stands for a study or series (includefield, matching keys the index lacks).
_FIRST_SERIES = ("(SELECT s1.series_instance_uid FROM series s1 WHERE s1.study_instance_uid = st.study_instance_uid "
                 "ORDER BY s1.first_received, s1.series_instance_uid LIMIT 1)")
_FIRST_INSTANCE = ("(SELECT i1.path FROM instances i1 WHERE i1.series_instance_uid = {series} "
                   "ORDER BY i1.instance_number, i1.sop_instance_uid LIMIT 1)")
_HEADER_PATH = {
    Level.STUDY: _FIRST_INSTANCE.format(series=_FIRST_SERIES),
    Level.SERIES: _FIRST_INSTANCE.format(series="se.series_instance_uid"),
    Level.INSTANCE: "i.path",
}


@dataclass
class _Plan:
    sql: str
    args: list[Any]
    residual: list[tuple[int, str]]  # matched against the header, in Python
    header_tags: set[int]            # returned from the header (includefield, matching keys)
    first_series_attrs: bool         # study level: includefield of series attributes kept in the index
    #: Study level, a limited search on broad keys only (wildcards, ranges, code lists): the same search among the
    #: :data:`RECENT_STUDIES` newest studies, tried first (see :func:`search`); None otherwise.
    recent_sql: str | None = None
    recent_args: list[Any] = field(default_factory=list)


#: How many of the newest studies a limited search on broad keys looks through before it asks the indexes.
RECENT_STUDIES = 2000


def plan(search: Search) -> _Plan:
    """The SQL that answers ``search`` (what the EXPLAIN QUERY PLAN test inspects) and what is left to Python."""
    level = search.level
    where: list[str] = []
    args: list[Any] = []
    if level is Level.STUDY:
        where.append("st.num_instances > 0")
    elif level is Level.SERIES:
        where.append("se.num_instances > 0")
    if search.study_uid is not None:
        where.append("se.study_instance_uid = ?" if level is not Level.STUDY else "st.study_instance_uid = ?")
        args.append(search.study_uid)
    if search.series_uid is not None:
        where.append("i.series_instance_uid = ?" if level is Level.INSTANCE else "se.series_instance_uid = ?")
        args.append(search.series_uid)
    residual: list[tuple[int, str]] = []
    returned = _returned_tags(level)
    header_tags: set[int] = set()
    selective = search.study_uid is not None or search.series_uid is not None
    broad = False
    for tag, pattern in search.filters:
        kw = keyword_for_tag(tag)
        key = MATCHING_KEYS.get(kw)
        if key is None or key.level.value > level.value:
            residual.append((tag, pattern))
        else:
            cond = _condition(key, pattern)
            if cond is not None:
                where.append(cond[0])
                args.extend(cond[1])
                if key.kind in ("uid", "int") or cond[0].endswith(" = ?") and key.kind in ("text", "pn"):
                    selective = True  # an equality on an index: few rows, found through it
                else:
                    broad = True
        if tag not in returned:
            header_tags.add(tag)  # matching keys are returned (PS3.18 10.6.3.3.1)
    first_series_attrs = False
    for tag in search.include:
        if tag in returned:
            continue
        if level is Level.STUDY and (tag in _SERIES_KEPT_TAGS or tag == _MODALITY):
            first_series_attrs = True
        else:
            header_tags.add(tag)
    select = _SELECT[level]
    if residual or header_tags or search.include_all:
        select += f", {_HEADER_PATH[level]} AS header_path"
    if first_series_attrs:
        select += (f", (SELECT s2.attrs FROM series s2 WHERE s2.series_instance_uid = {_FIRST_SERIES})"
                   " AS first_series_attrs"
                   f", (SELECT s3.modality FROM series s3 WHERE s3.series_instance_uid = {_FIRST_SERIES})"
                   " AS first_modality")
    tail = (" WHERE " + " AND ".join(where) if where else "") + f" ORDER BY {_ORDER[level]}"
    page: list[Any] = []
    if not residual and (search.limit is not None or search.offset):
        tail += " LIMIT ? OFFSET ?"
        page = [-1 if search.limit is None else search.limit + 1, search.offset]
    out = _Plan(f"SELECT {select} FROM {_FROM[level]}{tail}", args + page, residual, header_tags, first_series_attrs)
    if level is Level.STUDY and broad and not selective and not residual and search.limit is not None:
        # A wildcard or a range may match most studies: the index on it would then hand over most of the
        # archive to be sorted by arrival for one page. Among the newest studies such a page is found at once.
        out.recent_sql = (f"SELECT {select} FROM (SELECT * FROM studies ORDER BY {_ORDER[level].replace('st.', '')} "
                          f"LIMIT ?) st{tail}")
        out.recent_args = [RECENT_STUDIES] + args + page
    return out


def _returned_tags(level: Level) -> set[int]:
    kws: tuple[str, ...] = STUDY_TAGS if level is Level.STUDY else STUDY_TAGS + SERIES_TAGS
    if level is Level.INSTANCE:
        kws = kws + INSTANCE_TAGS
    return {int(tag_for_keyword(kw)) for kw in kws}  # type: ignore[arg-type]


def _value_strings(ds: Dataset, tag: int) -> list[str]:
    if tag not in ds:
        return []
    value = ds[tag].value
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v) for v in value]
    return [str(value)]


def matches(ds: Dataset, tag: int, pattern: str) -> bool:
    """PS3.4 C.2.2.2 matching of one header attribute: single value, wildcard (* ?), UID list, range (DA/TM/DT).

    Used for matching keys the index does not hold; person names are matched case-insensitively.
    """
    values = _value_strings(ds, tag)
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = "LO"
    if pattern.strip() == "" or (pattern.replace("*", "").strip() == "" and vr not in ("UI", "DA", "TM", "DT")):
        return True  # universal matching, as in the SQL (:func:`_condition`)
    if vr == "UI":
        wanted = {p.strip() for p in pattern.replace("\\", ",").split(",") if p.strip()}
        return any(v in wanted for v in values)
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        lo, _, hi = pattern.partition("-")
        return any((not lo or v >= lo) and (not hi or v <= hi) for v in values)
    alternatives = [p.strip() for p in _SPLIT.split(pattern)] if vr == "CS" else [pattern]
    fold = vr == "PN"
    for alt in alternatives:
        for v in values:
            a, b = (v.casefold(), alt.casefold()) if fold else (v, alt)
            if "*" in b or "?" in b:
                if fnmatch.fnmatchcase(a, b):
                    return True
            elif a == b:
                return True
    return False


# --- answers -------------------------------------------------------------------------------------


@dataclass
class SearchResult:
    """A QIDO-RS answer: the JSON array (text), and the Warning header values it needs."""

    body: str
    count: int
    warnings: list[str]


def _frag(tag: str, vr: str, values: Sequence[Any] | None) -> str:
    return f'"{tag}":' + (_dumps({"vr": vr, "Value": list(values)}) if values else f'{{"vr":"{vr}"}}')


def _inner(attrs: str | None) -> str:
    """The members of a stored JSON object, without its braces ('' when empty)."""
    return attrs[1:-1] if attrs and len(attrs) > 2 else ""


def _row_fragments(level: Level, r: sqlite3.Row, read_header: Callable[[Path], Dataset]) -> list[str]:
    out = [_frag("0020000D", "UI", [r["study_instance_uid"]]), _inner(r["study_attrs"])]
    if level is Level.STUDY:
        mods = [m for m in (r["modalities"] or "").split("\\") if m]
        out += [_frag("00080061", "CS", mods), _frag("00201206", "IS", [r["num_series"]]),
                _frag("00201208", "IS", [r["study_instances"]])]
        return out
    out += [_frag("0020000E", "UI", [r["series_instance_uid"]]), _inner(r["series_attrs"])]
    if level is Level.SERIES:
        out += [_frag("00080060", "CS", [r["modality"]] if r["modality"] else None),
                _frag("00201209", "IS", [r["series_instances"]])]
        return out
    if r["modality"]:
        out.append(_frag("00080060", "CS", [r["modality"]]))
    out += [_frag("00080016", "UI", [r["sop_class_uid"]]), _frag("00080018", "UI", [r["sop_instance_uid"]])]
    if r["instance_number"] is not None:
        out.append(_frag("00200013", "IS", [r["instance_number"]]))
    if r["transfer_syntax_uid"]:
        out.append(_frag("00083002", "UI", [r["transfer_syntax_uid"]]))
    numbers: dict[str, Any] = {kw: r[col] for kw, col in (("Rows", "pixel_rows"), ("Columns", "pixel_columns"),
                                                          ("BitsAllocated", "bits_allocated"),
                                                          ("NumberOfFrames", "number_of_frames"))}
    if not r["header_indexed"]:  # indexed before the index kept them: from the header, as before
        try:
            header = read_header(Path(r["path"]))
            numbers = {kw: header.get(kw) for kw in numbers}
        except Exception as exc:  # a file gone or unreadable: answered without them
            logger.warning("QIDO-RS: header of %s unreadable (%s)", r["sop_instance_uid"], type(exc).__name__)
    for value, (tag, vr) in zip(numbers.values(), (("00280010", "US"), ("00280011", "US"), ("00280100", "US"),
                                                         ("00280008", "IS")), strict=True):
        if value is not None and value != "":
            out.append(_frag(tag, vr, [int(value)]))
    return out


def search(select: Callable[[str, Sequence[Any]], list[sqlite3.Row]], query: Search,
           read_header: Callable[[Path], Dataset]) -> SearchResult:
    """Answer a QIDO-RS search from the index.

    Parameters
    ----------
    select
        Runs a read-only SQL query on the store's index (:meth:`dicom_io.store.Store.select`).
    query
        The parsed request (:func:`parse_search`).
    read_header
        Reads a stored file's header (no pixel data), for includefield attributes and matching keys the
        index does not hold.

    Returns
    -------
    SearchResult
        The matching studies, series or instances, newest first, paged by limit/offset.
    """
    p = plan(query)
    rows = None
    if p.recent_sql is not None and query.limit is not None:
        rows = select(p.recent_sql, p.recent_args)
        if len(rows) <= query.limit:
            rows = None  # not a full page among the newest studies (or no more beyond it): ask the indexes
    if rows is None:
        rows = select(p.sql, p.args)
    warnings = [FUZZY_WARNING] if query.fuzzy else []
    headers: dict[int, Dataset | None] = {}

    def header(i: int, r: sqlite3.Row) -> Dataset | None:
        if i not in headers:
            path = r["header_path"]
            try:
                headers[i] = read_header(Path(path)) if path else None
            except Exception as exc:  # a file gone or unreadable: answered without it
                logger.warning("QIDO-RS: header of %s unreadable (%s)", Path(path).name, type(exc).__name__)
                headers[i] = None
        return headers[i]

    indices = list(range(len(rows)))
    if p.residual:
        kept = []
        for i in indices:
            ds = header(i, rows[i])
            if ds is not None and all(matches(ds, tag, pattern) for tag, pattern in p.residual):
                kept.append(i)
        stop = None if query.limit is None else query.offset + query.limit + 1
        indices = kept[query.offset:stop]
    more = query.limit is not None and len(indices) > query.limit
    if more:
        indices = indices[:query.limit]
        warnings.append(MORE_WARNING)
    items = []
    for i in indices:
        r = rows[i]
        text = "{" + ",".join(f for f in _row_fragments(query.level, r, read_header) if f) + "}"
        if p.header_tags or query.include_all or p.first_series_attrs:
            text = _with_extras(text, r, header(i, r) if (p.header_tags or query.include_all) else None, p, query)
        items.append(text)
    return SearchResult("[" + ",".join(items) + "]", len(items), warnings)


def _with_extras(text: str, r: sqlite3.Row, ds: Dataset | None, p: _Plan, query: Search) -> str:
    data = json.loads(text)
    if p.first_series_attrs:
        series = json.loads(r["first_series_attrs"] or "{}")
        if r["first_modality"]:
            series["00080060"] = {"vr": "CS", "Value": [r["first_modality"]]}
        for tag in query.include:
            key = f"{tag:08X}"
            if key not in data and key in series:
                data[key] = series[key]
    if ds is not None:
        extra = Dataset()
        if query.include_all:
            for elem in ds:
                if f"{int(elem.tag):08X}" not in data and elem.tag.group != 0x0002 and elem.tag != 0x7FE00010:
                    extra.add(elem)
        for tag in p.header_tags:
            if f"{tag:08X}" not in data and tag in ds:
                extra.add(ds[tag])
        more = extra.to_json_dict(bulk_data_threshold=1 << 30, suppress_invalid_tags=True)
        for key, value in more.items():
            data.setdefault(key, value)
    return _dumps(data)


__all__ = [
    "FUZZY_WARNING", "HEADER_KEYWORDS", "INSTANCE_TAGS", "IndexedAttributes", "Level", "MATCHING_KEYS",
    "MORE_WARNING", "SERIES_COLUMNS", "SERIES_KEPT", "SERIES_TAGS", "STUDY_COLUMNS", "STUDY_KEPT", "STUDY_TAGS",
    "Search", "SearchResult", "attribute_tag", "matches", "parse_search", "plan", "search",
]
