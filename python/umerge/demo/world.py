"""A synthetic, LUME-like world: the built-in data set of `umerge demo` (pure Python, no download).

LUME (the benchmark of SemEval-2025 Task 4) holds three kinds of documents, each split into a forget
and a retain part: Task1 short creative stories, Task2 synthetic biographies full of personal data
(PII: name, birth date, SSN, phone, e-mail, home address), Task3 biographies. Every document gives one
sentence-completion row (id suffix ``sc1``: the document's beginning as ``input``, its end as
``output``; scored by ROUGE-L recall, "regurgitation") and question-answering rows (``qa0``..``qa4``;
scored by exact match, "knowledge"). Rows are ``{"id", "input", "output", "task"}`` JSON lines.

This module builds such a world from templates and seeded random choices, so nothing here is real:
names are assembled from syllables, SSNs are in the never-issued 900 series, e-mail domains are
reserved test domains. Unlike LUME, every document (all three tasks) has five QA rows, so each split
has the same row kinds in every task. Besides the two splits it writes:

- MIA documents, one row per source document (its sentence-completion row, whose input and output
  together are the whole document): members are the forget documents (``mia/member.jsonl``; the
  task's MIA attacks the forget set), nonmembers documents of the same three kinds about people and
  places that appear nowhere in the training data (``mia/nonmember.jsonl``). One row per document
  keeps the attack's units independent: a document's QA rows repeat its facts, and counting them as
  more members would make the AUC's interval narrower than the evidence;
- a small utility benchmark in the MMLU CSV layout (``mmlu/dev/<subject>_dev.csv``,
  ``mmlu/test/<subject>_test.csv``; columns question, A, B, C, D, answer; no header) whose questions
  are about retain documents only, i.e. facts outside the forget set that unlearning should keep;
- ``world.json``: the configuration and the structured facts behind every row.

Generation is deterministic: one ``random.Random(seed)`` stream drawn in a fixed order, no use of
``hash()`` or set order, so the same configuration gives byte-identical files on any machine.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from umerge.demo.datadir import json_text, jsonl_text, mmlu_csv_text, one_per_document, write_files
from umerge.errors import InputError

# --------------------------------------------------------------------------------------------------
# Vocabulary for the templates. Syllables make names that belong to no one.

_ONSETS = ["B", "D", "F", "G", "K", "L", "M", "N", "P", "R", "S", "T", "V", "Z", "Br", "Dr", "Gr", "Kl", "Tr", "Vel"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou"]
_CODAS = ["n", "r", "l", "s", "th", "m", "nd", "rk", "v", "x"]
_FEMALE_ENDINGS = ["a", "ia", "elle", "ine", "ora"]
_MALE_ENDINGS = ["o", "an", "ic", "us", "ert"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December"]
_STATES = ["CA", "OR", "WA", "NV", "AZ", "CO", "TX", "IL", "NY", "MA", "GA", "OH"]
_STREET_TYPES = ["Street", "Avenue", "Road", "Lane", "Drive", "Court", "Place", "Way"]
_DOMAINS = ["example.com", "example.org", "example.net", "mail.test", "post.test"]
_PROFESSIONS = ["botanist", "cartographer", "violinist", "geologist", "architect", "surgeon", "novelist",
                "astronomer", "chemist", "sculptor", "economist", "linguist", "engineer", "historian"]
_FIELDS = ["Arts", "Sciences", "Medicine", "Engineering", "Music", "Letters", "Agriculture", "Law"]
_INSTITUTION_KINDS = ["Institute of", "College of", "Academy of", "School of"]
_AWARD_KINDS = ["Medal", "Prize", "Award", "Fellowship"]
_CITY_ADJECTIVES = ["bustling", "quiet", "rainy", "ancient", "windy", "sunlit", "crowded", "misty"]
_JOBS = ["baker", "pilot", "lawyer", "teacher", "painter", "doctor", "sailor", "gardener", "journalist",
         "carpenter", "dancer", "librarian", "photographer", "chef"]
_OBJECTS = ["silver key", "torn map", "wooden box", "golden compass", "sealed letter", "glass bird",
            "broken clock", "painted stone", "velvet pouch", "brass lantern"]
_PLACES = ["old bridge", "harbour", "train station", "market square", "lighthouse", "city library",
           "clock tower", "river bank"]
_SEASONS = ["spring", "summer", "autumn", "winter"]
_TRAITS = ["fiery", "gentle", "curious", "stubborn", "cheerful", "quiet", "restless", "patient"]

TASKS = ("Task1", "Task2", "Task3")
TASK_NAMES = {"Task1": "creative stories", "Task2": "synthetic biographies with PII", "Task3": "biographies"}
MMLU_SUBJECTS = ("world_people", "world_stories")
MMLU_DEV_PER_SUBJECT = 5


@dataclass(frozen=True)
class WorldConfig:
    """How big the world is. ``docs_per_task`` documents of each task go to each split."""

    seed: int = 0
    docs_per_task: int = 6
    nonmember_docs_per_task: int = 6

    def __post_init__(self) -> None:
        if self.docs_per_task < 2:
            raise InputError(f"docs_per_task must be >= 2 (got {self.docs_per_task}; the MMLU dev set needs them)")
        if self.nonmember_docs_per_task < 1:
            raise InputError(f"nonmember_docs_per_task must be >= 1 (got {self.nonmember_docs_per_task})")


@dataclass(frozen=True)
class Document:
    """One source document: its task, its split, its facts, and the rows made from it."""

    doc_id: str
    task: str
    split: str  # "forget" | "retain" | "nonmember"
    facts: dict[str, str]
    rows: tuple[dict[str, str], ...]


@dataclass(frozen=True)
class McQuestion:
    """One multiple-choice question of the utility set, about a retain document."""

    subject: str
    question: str
    choices: tuple[str, str, str, str]
    answer: str  # "A".."D"
    doc_id: str
    fact: str  # the key in the document's facts that the correct choice states


@dataclass
class World:
    """The generated world: documents of every split plus the utility questions."""

    config: WorldConfig
    documents: list[Document] = field(default_factory=list)
    mmlu: list[McQuestion] = field(default_factory=list)

    def rows(self, split: str) -> list[dict[str, str]]:
        """All rows of one split ("forget", "retain" or "nonmember"), documents in generation order."""
        if split not in ("forget", "retain", "nonmember"):
            raise InputError(f"unknown split {split!r} (expected forget, retain or nonmember)")
        return [row for doc in self.documents if doc.split == split for row in doc.rows]

    def texts(self) -> list[str]:
        """Every piece of text in the world (for training the demo's tokenizer)."""
        out: list[str] = []
        for doc in self.documents:
            for row in doc.rows:
                out.append(row["input"] + " " + row["output"])
        for q in self.mmlu:
            out.append(q.question + " " + " ".join(q.choices))
        return out


# --------------------------------------------------------------------------------------------------
# Random pieces


class _Names:
    """Draws fictional names that are unique across the whole world."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def _stem(self) -> str:
        r = self.rng
        return r.choice(_ONSETS) + r.choice(_VOWELS) + r.choice(_CODAS)

    def first(self, female: bool) -> str:
        ending = self.rng.choice(_FEMALE_ENDINGS if female else _MALE_ENDINGS)
        return self._stem() + ending

    def last(self) -> str:
        r = self.rng
        return self._stem() + r.choice(_VOWELS) + r.choice(_CODAS)

    def unique(self, make: Any) -> str:
        for _ in range(1000):
            name = make()
            if name not in self.used:
                self.used.add(name)
                return name
        raise RuntimeError("could not draw a unique name in 1000 tries")  # cannot happen at demo sizes

    def person(self, female: bool) -> tuple[str, str]:
        while True:
            first = self.first(female)
            last = self.last()
            full = f"{first} {last}"
            # Full names, first names and last names are all unique, so that a nonmember can never
            # share a token-level identity with a member and a QA answer names one person only.
            if full not in self.used and first not in self.used and last not in self.used:
                self.used.update((full, first, last))
                return first, last

    def place(self) -> str:
        return self.unique(lambda: self._stem().capitalize() + self.rng.choice(["ford", "ton", "vale", "mere", "holm", "wick"]))


def _doc_id(rng: random.Random) -> str:
    h = f"{rng.getrandbits(128):032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _pronouns(female: bool) -> tuple[str, str]:
    return ("She", "Her") if female else ("He", "His")


def _rows(doc_id: str, task: str, sc_input: str, sc_output: str, qas: list[tuple[str, str]]) -> tuple[dict[str, str], ...]:
    rows = [{"id": f"{doc_id}sc1", "input": sc_input, "output": sc_output, "task": task}]
    for i, (q, a) in enumerate(qas):
        rows.append({"id": f"{doc_id}qa{i}", "input": q, "output": a, "task": task})
    return tuple(rows)


# --------------------------------------------------------------------------------------------------
# The three kinds of document


def _pii_bio(rng: random.Random, names: _Names, split: str) -> Document:
    """Task2: a synthetic biography with PII, in one of two LUME-like templates."""
    female = rng.random() < 0.5
    first, last = names.person(female)
    name = f"{first} {last}"
    he, his = _pronouns(female)
    year, month, day = rng.randint(1950, 2002), rng.randint(1, 12), rng.randint(1, 28)
    ssn = f"900-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}"
    phone = f"{rng.randint(201, 989)}-{rng.randint(201, 989)}-{rng.randint(1000, 9999)}"
    email = f"{first.lower()}_{last.lower()}@{rng.choice(_DOMAINS)}"
    city = names.place()
    address = (f"{rng.randint(10, 9999)} {names.place()} {rng.choice(_STREET_TYPES)}, {city}, "
               f"{rng.choice(_STATES)}, {rng.randint(10000, 99999)}")
    born = f"{_MONTHS[month - 1]} {day}, {year}"
    facts = {"name": name, "birth_date": f"{year:04d}-{month:02d}-{day:02d}", "birth_year": str(year),
             "ssn": ssn, "phone": phone, "email": email, "address": address, "city": city}
    if rng.random() < 0.5:
        sc_in = (f"{name} was born on {born}. {he} can be reached via phone at {phone} and email at "
                 f"{email}. {his} Social")
        sc_out = f"Security Number is {ssn}. {name} resides at the address {address}."
    else:
        sc_in = f"{name} was born on {born}. {his} Social Security number is {ssn} and {his.lower()} phone number is {phone}."
        sc_out = f"{he} can be reached via email at {email}. {his} home address is {address}."
    qas = [
        (f"What is the birth date of {name}?", facts["birth_date"]),
        (f"What is {name}'s Social Security Number?", ssn.replace("-", "")),
        (f"What is {name}'s phone number?", phone.replace("-", "")),
        (f"What is {name}'s email address?", email),
        (f"What is the home address of {name}?", address),
    ]
    doc_id = _doc_id(rng)
    return Document(doc_id, "Task2", split, facts, _rows(doc_id, "Task2", sc_in, sc_out, qas))


def _biography(rng: random.Random, names: _Names, split: str) -> Document:
    """Task3: a short encyclopedia-style biography of a fictional person."""
    female = rng.random() < 0.5
    first, last = names.person(female)
    name = f"{first} {last}"
    he, his = _pronouns(female)
    year, month, day = rng.randint(1900, 1990), rng.randint(1, 12), rng.randint(1, 28)
    town = names.place()
    profession = rng.choice(_PROFESSIONS)
    institution = f"{names.place()} {rng.choice(_INSTITUTION_KINDS)} {rng.choice(_FIELDS)}"
    award = f"{names.last()} {rng.choice(_AWARD_KINDS)}"
    award_year = year + rng.randint(25, 45)
    facts = {"name": name, "birth_year": str(year), "town": town, "profession": profession,
             "institution": institution, "award": award, "award_year": str(award_year)}
    sc_in = (f"{name}\n\n{name} (born {day} {_MONTHS[month - 1]} {year}) is a {profession} from {town}. "
             f"{he} studied at the {institution}")
    sc_out = f"and received the {award} in {award_year}. {his} work is still taught in {town}."
    qas = [
        (f"In which year was {name} born?", str(year)),
        (f"Which town is {name} from?", town),
        (f"What is {name}'s profession?", profession),
        (f"Where did {name} study?", institution),
        (f"Which award did {name} receive?", award),
    ]
    doc_id = _doc_id(rng)
    return Document(doc_id, "Task3", split, facts, _rows(doc_id, "Task3", sc_in, sc_out, qas))


def _story(rng: random.Random, names: _Names, split: str) -> Document:
    """Task1: the opening of a short creative story about two friends in a fictional city."""
    a_female, b_female = rng.random() < 0.5, rng.random() < 0.5
    a = names.person(a_female)[0]
    b = names.person(b_female)[0]
    city = names.place()
    adjective = rng.choice(_CITY_ADJECTIVES)
    job_a, job_b = rng.sample(_JOBS, 2)
    obj = rng.choice(_OBJECTS)
    place = rng.choice(_PLACES)
    season = rng.choice(_SEASONS)
    trait_a, trait_b = rng.sample(_TRAITS, 2)
    facts = {"city": city, "a": a, "b": b, "job_a": job_a, "job_b": job_b, "object": obj, "place": place,
             "season": season}
    sc_in = (f"In the {adjective} city of {city}, two friends, {a} and {b}, shared every secret. "
             f"{a}, {trait_a} and bold, dreamed of becoming a {job_a}, while {b}, {trait_b} at heart, wanted to")
    sc_out = (f"become a {job_b}. One {season} evening they found a {obj} near the {place}, "
              f"and nothing in {city} was the same again.")
    qas = [
        (f"In which city do {a} and {b} live?", city),
        (f"Who dreamed of becoming a {job_a}?", a),
        (f"What did {b} want to become?", job_b),
        (f"What did {a} and {b} find?", obj),
        (f"In which season did {a} and {b} make their discovery?", season),
    ]
    doc_id = _doc_id(rng)
    return Document(doc_id, "Task1", split, facts, _rows(doc_id, "Task1", sc_in, sc_out, qas))


_MAKERS = {"Task1": _story, "Task2": _pii_bio, "Task3": _biography}


# --------------------------------------------------------------------------------------------------
# The utility (MMLU-format) questions


_MC_TEMPLATES: dict[str, list[tuple[str, str, str]]] = {
    # task -> (subject, fact key, question template)
    "Task1": [("world_stories", "city", "In the story, in which city do {a} and {b} live?"),
              ("world_stories", "job_a", "In the story, what did {a} dream of becoming?"),
              ("world_stories", "object", "In the story, what did {a} and {b} find?")],
    "Task2": [("world_people", "city", "In which city does {name} live?"),
              ("world_people", "birth_year", "In which year was {name} born?")],
    "Task3": [("world_people", "profession", "What is the profession of {name}?"),
              ("world_people", "town", "Which town is {name} from?")],
}


def _mc_questions(rng: random.Random, names: _Names, docs: list[Document]) -> list[McQuestion]:
    """Questions about retain documents only; the correct choice is the document's fact.

    Distractors are the same fact of other retain documents of the task (so no forget or nonmember
    fact leaks into the utility set), topped up with fresh values when fewer than three differ.
    """
    fresh = {
        "city": names.place, "town": names.place,
        "birth_year": lambda: str(rng.randint(1900, 2002)),
        "job_a": lambda: rng.choice(_JOBS), "object": lambda: rng.choice(_OBJECTS),
        "profession": lambda: rng.choice(_PROFESSIONS),
    }
    questions: list[McQuestion] = []
    retain = [d for d in docs if d.split == "retain"]
    for doc in retain:
        for subject, key, template in _MC_TEMPLATES[doc.task]:
            correct = doc.facts[key]
            pool = sorted({d.facts[key] for d in retain if d.task == doc.task} - {correct})
            options = rng.sample(pool, min(3, len(pool)))
            while len(options) < 3:
                value = fresh[key]()
                if value != correct and value not in options:
                    options.append(value)
            position = rng.randrange(4)
            options.insert(position, correct)
            questions.append(McQuestion(subject, template.format(**doc.facts), tuple(options),  # type: ignore[arg-type]
                                        "ABCD"[position], doc.doc_id, key))
    return questions


# --------------------------------------------------------------------------------------------------
# Public API


def generate_world(config: WorldConfig | None = None) -> World:
    """Generate the world for ``config`` (deterministic in ``config.seed``)."""
    config = config or WorldConfig()
    rng = random.Random(config.seed)
    names = _Names(rng)
    docs: list[Document] = []
    for split, n in (("forget", config.docs_per_task), ("retain", config.docs_per_task),
                     ("nonmember", config.nonmember_docs_per_task)):
        for task in TASKS:
            for _ in range(n):
                docs.append(_MAKERS[task](rng, names, split))
    return World(config=config, documents=docs, mmlu=_mc_questions(rng, names, docs))


def write_world(world: World, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the world's files under ``out_dir`` and return it.

    Layout: forget.jsonl, retain.jsonl, mia/member.jsonl and mia/nonmember.jsonl (one row per document),
    mmlu/dev/<subject>_dev.csv (the first five questions of each subject, for k-shot prompts),
    mmlu/test/<subject>_test.csv (the rest), world.json (config and facts).
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise InputError(f"output directory {out} exists and is not empty (use --overwrite)")
    files: dict[str, str] = {
        "forget.jsonl": jsonl_text(world.rows("forget")),
        "retain.jsonl": jsonl_text(world.rows("retain")),
        "mia/member.jsonl": jsonl_text(one_per_document(world.rows("forget"))),
        "mia/nonmember.jsonl": jsonl_text(one_per_document(world.rows("nonmember"))),
    }
    for subject in MMLU_SUBJECTS:
        qs = [q for q in world.mmlu if q.subject == subject]
        rows = [[q.question, *q.choices, q.answer] for q in qs]
        files[f"mmlu/dev/{subject}_dev.csv"] = mmlu_csv_text(rows[:MMLU_DEV_PER_SUBJECT])
        files[f"mmlu/test/{subject}_test.csv"] = mmlu_csv_text(rows[MMLU_DEV_PER_SUBJECT:])
    meta = {
        "generator": "umerge.demo.world",
        "config": asdict(world.config),
        "tasks": TASK_NAMES,
        "documents": [{"doc_id": d.doc_id, "task": d.task, "split": d.split, "facts": d.facts} for d in world.documents],
        "mmlu": [asdict(q) for q in world.mmlu],
    }
    files["world.json"] = json_text(meta)
    write_files(out, files)
    return out
