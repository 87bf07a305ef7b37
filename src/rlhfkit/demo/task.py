"""The demo task: one-sentence movie reviews, where people prefer the upbeat ones.

Everything here is generated from small hand-written phrase pools, so the demo needs no
data download: `demo_prompts` builds several hundred review requests ("Write a
one-sentence review of a heist thriller set in Lisbon."), `sft_examples` writes reviews of
mixed sentiment for the supervised warm-up, and `gold_score` / `gold_reward` stand in for
human judgement with VADER's compound sentiment score (-1 very negative .. +1 very positive).
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass
from functools import lru_cache

from rlhfkit.errors import RlhfkitError

TASK_DESCRIPTION = (
    "Write a one-sentence movie review for a prompt such as "
    "'Write a one-sentence review of a heist thriller set in Lisbon.' "
    "People prefer positive reviews; VADER's compound score is the gold judge."
)

NUM_PROMPTS = 800
HELDOUT_FRACTION = 0.15
NUM_SFT_EXAMPLES = 480
MAX_REVIEW_WORDS = 30

# VADER's own convention for calling a text positive, negative or neutral.
POSITIVE_THRESHOLD = 0.05
NEGATIVE_THRESHOLD = -0.05

# --------------------------------------------------------------------------------------
# Phrase pools. Each genre comes with a few story elements (all singular noun phrases with
# "the", so any review template can say "<element> is ..." or "<element> that never lands").

GENRES: dict[str, tuple[str, ...]] = {
    "heist thriller": ("the vault-cracking sequence", "the getaway chase", "the last double-cross", "the planning montage"),
    "space opera": ("the starship battle", "the alien council scene", "the sweeping score", "the production design"),
    "romantic comedy": ("the meet-cute", "the banter between the leads", "the wedding finale", "the confession in the rain"),
    "horror film": ("the creaking-house sequence", "the creature design", "the basement scene", "the sound design"),
    "courtroom drama": ("the closing argument", "the cross-examination", "the jury-room scene", "the surprise witness"),
    "western": ("the standoff at noon", "the cattle drive", "the saloon scene", "the landscape photography"),
    "animated musical": ("the opening number", "the hand-drawn animation", "the villain's song", "the talking-parrot sidekick"),
    "war epic": ("the beach landing", "the trench sequence", "the battlefield photography", "the letter-reading scene"),
    "coming-of-age drama": ("the last day of summer", "the school dance", "the road trip with friends", "the scene with the father"),
    "detective noir": ("the voice-over narration", "the shadowy cinematography", "the interrogation scene", "the final twist"),
    "disaster movie": ("the tidal wave sequence", "the evacuation scene", "the visual-effects work", "the rescue on the bridge"),
    "sports drama": ("the championship game", "the training montage", "the locker-room speech", "the final match"),
    "fantasy adventure": ("the dragon sequence", "the enchanted forest", "the quest for the crown", "the creature work"),
    "zombie comedy": ("the shopping-mall siege", "the deadpan humor", "the makeup work", "the pub showdown"),
    "spy thriller": ("the rooftop chase", "the code-breaking subplot", "the train sequence", "the gadget reveal"),
    "biopic": ("the central performance", "the early-years flashback", "the concert scene", "the archival footage"),
    "documentary": ("the interview footage", "the handheld camerawork", "the narration", "the time-lapse footage"),
    "superhero film": ("the origin story", "the third-act battle", "the costume design", "the villain's monologue"),
    "period romance": ("the ballroom scene", "the exchange of letters", "the candlelit photography", "the carriage ride"),
    "psychological thriller": ("the unreliable narrator", "the mirror scene", "the slow-burn pacing", "the final reveal"),
    "road movie": ("the desert highway", "the motel scene", "the soundtrack of old songs", "the diner conversation"),
    "martial-arts film": ("the fight choreography", "the teahouse brawl", "the training sequence", "the duel on the rooftop"),
    "science-fiction mystery": ("the time-loop puzzle", "the laboratory set", "the eerie score", "the final reveal"),
    "family comedy": ("the holiday dinner scene", "the slapstick finale", "the grandmother subplot", "the camping trip"),
}


def _a(phrase: str) -> str:
    """The indefinite article for `phrase` ("a 1970s ...", "an Edwardian ...")."""
    first = phrase.strip()[:1].lower()
    return "an" if first in "aeiou" and first != "" else "a"


def _with_article(phrase: str) -> str:
    return f"{_a(phrase)} {phrase}"


@dataclass(frozen=True)
class Setting:
    """Where a film is set: as the prompt says it, and as a review refers back to it."""

    prompt: str  # "in Lisbon", "aboard a submarine"
    where: str  # "in Lisbon", "aboard the submarine"
    place: str  # "Lisbon", "the submarine"


def _city(name: str) -> Setting:
    return Setting(f"in {name}", f"in {name}", name)


def _site(preposition: str, noun: str) -> Setting:
    return Setting(f"{preposition} {_a(noun)} {noun}", f"{preposition} the {noun}", f"the {noun}")


SETTINGS: tuple[Setting, ...] = (
    *(
        _city(name)
        for name in (
            "Lisbon", "Tokyo", "Cairo", "Reykjavik", "Mumbai", "Buenos Aires", "New Orleans",
            "Istanbul", "Havana", "Seoul", "Marrakesh", "Nairobi", "Venice", "Montreal",
            "Naples", "Berlin", "Lagos", "Hong Kong", "Prague", "Victorian London",
        )
    ),
    _site("in", "Martian colony"),
    _site("aboard", "submarine"),
    _site("at", "ski resort"),
    _site("in", "small Texas town"),
    _site("aboard", "cruise ship"),
    _site("on", "space station"),
    _site("in", "Alpine village"),
    _site("at", "desert oasis"),
    Setting("in the Scottish Highlands", "in the Scottish Highlands", "the Scottish Highlands"),
)

ERAS: tuple[str, ...] = (
    "1920s", "1940s", "1950s", "1960s", "1970s", "1980s", "1990s",
    "medieval", "near-future", "Cold War", "Prohibition-era", "Edwardian",
)

SUBJECTS: tuple[str, ...] = (
    "a lighthouse keeper", "a retired boxer", "twin sisters", "a stolen violin", "a robot chef",
    "a jazz pianist", "a washed-up detective", "a runaway bride", "a night-shift nurse",
    "two rival bakers", "an astronaut on her last mission", "a chess prodigy", "a small-town mayor",
    "an aging rock band", "a charming con artist", "a taxi driver", "a family of circus performers",
    "a forgotten movie star", "a teenage inventor", "a retired spy", "a stubborn goat farmer",
    "a marine biologist", "a wedding photographer", "an elderly locksmith",
)

# Prompt phrasings; each names the slots it needs.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "Write a one-sentence review of {a_genre} set {setting}.",
    "In one sentence, review {a_era_genre} about {subject}.",
    "Write a one-sentence movie review of {a_genre} about {subject}.",
    "Review {a_genre} set {setting} in a single sentence.",
    "Give a one-sentence review of {a_era_genre} set {setting}.",
    "Write a one-sentence review of {a_genre} about {subject}, set {setting}.",
    "In a single sentence, tell me what you thought of {a_era_genre} set {setting}.",
    "Write a one-sentence review of {a_era_genre} about {subject}.",
    "Describe, in one sentence, your opinion of {a_genre} about {subject} set {setting}.",
    "Write a short, one-sentence review of {a_genre} set {setting}.",
)

# Review templates by intended sentiment. Slots: genre, element, where, place, Place, subj,
# era, pos, neg, plain (adjectives), a_pos/a_neg/a_plain (the adjective with its article).
POSITIVE_REVIEWS: tuple[str, ...] = (
    "{A_pos} {genre} {where}, with {element} that kept me grinning from start to finish.",
    "This {genre} is a genuine delight, {element} is {pos}, and {place} has never looked better on screen.",
    "Smart and {pos}, this {era} {genre} turns {subj} into someone you cannot help rooting for.",
    "I loved every minute of this {genre}, from {element} to a final scene that truly earns its emotions.",
    "Thanks to {element}, this {genre} about {subj} is the most fun I have had at the movies all year.",
    "{Place} looks gorgeous in this {pos} {genre}, and {element} alone is worth the ticket price.",
    "A confident, big-hearted {genre} where {element} had the whole audience cheering.",
    "Beautifully shot and wonderfully acted, this {genre} {where} is an easy recommendation for anyone.",
    "{Element} is a small triumph, and the rest of this {pos} {era} {genre} is nearly as good.",
    "An absolute joy, this {genre} finds real warmth in {subj} and makes {element} feel fresh again.",
    "Funny, tender and {pos}, this {genre} {where} is the kind of film you want to watch twice.",
)

NEGATIVE_REVIEWS: tuple[str, ...] = (
    "This {genre} {where} wastes a promising idea on {neg} dialogue and {element} that never lands.",
    "Not even {element} can save this {neg} {genre}, which drags badly long before its limp ending.",
    "I was bored within twenty minutes of this {era} {genre}, and {subj} never becomes more than a cardboard cutout.",
    "{Place} deserves better than this {neg}, lifeless {genre}, in which {element} feels cheap and rushed.",
    "A clumsy, overlong {genre} about {subj} that mistakes noise for excitement and confusion for depth.",
    "Despite a few pretty shots of {place}, this {genre} is a tedious mess with nothing to say.",
    "Skip this {genre}, because {element} is {neg} and every performance is flat and lifeless.",
    "{Element} is the low point of a {neg} {era} {genre} that seems to hate its own characters.",
    "This is a dreary, forgettable {genre} whose worst sin is turning {element} into a chore.",
    "An ugly, confused {genre} {where} that left me angry at the two hours I wasted on it.",
    "Poorly written and badly paced, this {genre} about {subj} is a frustrating failure from start to finish.",
)

NEUTRAL_REVIEWS: tuple[str, ...] = (
    "This {genre} follows {subj} {where} over a single long weekend and runs just under two hours.",
    "{A_plain} {era} {genre} that spends most of its running time on {element} and ends roughly where you expect.",
    "Set {where}, this {genre} moves back and forth between {element} and quiet scenes of {subj} at home.",
    "Half {genre} and half character study, the film centers on {element} and a cast of mostly unknown actors.",
    "This {plain} {genre} about {subj} has a few strong moments and a few weak ones, and {element} is somewhere in between.",
    "The {genre} {where} is competent enough, though {element} feels familiar and the ending arrives abruptly.",
    "Most of this {era} {genre} takes place {where}, with {element} as its centerpiece and little else to report.",
    "A {genre} about {subj}, told mostly through {element}, that neither surprises nor disappoints.",
    "{Element} takes up the middle hour of this {plain} {genre}, which sticks closely to the usual formula.",
    "This {genre} is exactly what the poster suggests, with {element}, a few famous faces and a tidy ending.",
)

POSITIVE_ADJECTIVES = (
    "sharp", "radiant", "witty", "stylish", "heartfelt", "clever", "dazzling", "tender",
    "thrilling", "inventive", "delightful", "moving",
)
NEGATIVE_ADJECTIVES = (
    "dull", "tedious", "clumsy", "lifeless", "muddled", "bland", "sloppy", "shallow", "stale",
    "messy", "boring", "lazy",
)
PLAIN_ADJECTIVES = (
    "modest", "straightforward", "conventional", "talky", "old-fashioned", "quiet",
    "low-budget", "mid-length", "familiar", "by-the-numbers",
)

_REVIEW_POOLS = {"positive": POSITIVE_REVIEWS, "negative": NEGATIVE_REVIEWS, "neutral": NEUTRAL_REVIEWS}


# --------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class PromptSpec:
    """One review request: its text and the slots it was built from (None if unused)."""

    text: str
    genre: str
    setting: Setting | None
    era: str | None
    subject: str | None


def _definite(subject: str) -> str:
    """'a retired boxer' -> 'the retired boxer'; 'twin sisters' -> 'the twin sisters'."""
    for article in ("a ", "an "):
        if subject.startswith(article):
            return "the " + subject[len(article) :]
    return "the " + subject


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def _make_spec(template: str, rng: random.Random) -> PromptSpec:
    genre = rng.choice(sorted(GENRES))
    fields = _fields(template)
    setting = rng.choice(SETTINGS) if "setting" in fields else None
    era = rng.choice(ERAS) if "a_era_genre" in fields else None
    subject = rng.choice(SUBJECTS) if "subject" in fields else None
    values = {
        "a_genre": _with_article(genre),
        "a_era_genre": _with_article(f"{era} {genre}") if era else "",
        "setting": setting.prompt if setting else "",
        "subject": subject or "",
    }
    return PromptSpec(template.format(**values), genre, setting, era, subject)


@lru_cache(maxsize=8)
def _split_specs(seed: int) -> tuple[tuple[PromptSpec, ...], tuple[PromptSpec, ...]]:
    rng = random.Random(f"rlhfkit-demo-prompts-{seed}")
    specs: dict[str, PromptSpec] = {}
    attempts = 0
    while len(specs) < NUM_PROMPTS:
        attempts += 1
        if attempts > 100 * NUM_PROMPTS:  # pragma: no cover - the pools allow far more
            raise RuntimeError("prompt pools too small for NUM_PROMPTS distinct prompts")
        spec = _make_spec(PROMPT_TEMPLATES[attempts % len(PROMPT_TEMPLATES)], rng)
        specs.setdefault(spec.text, spec)
    ordered = list(specs.values())
    rng.shuffle(ordered)
    num_heldout = round(HELDOUT_FRACTION * len(ordered))
    return tuple(ordered[num_heldout:]), tuple(ordered[:num_heldout])


def demo_prompt_specs(seed: int = 0) -> tuple[list[PromptSpec], list[PromptSpec]]:
    """(train, held-out) prompt specs; see `demo_prompts`."""
    train, heldout = _split_specs(seed)
    return list(train), list(heldout)


def demo_prompts(seed: int = 0) -> tuple[list[str], list[str]]:
    """(train prompts, held-out prompts): 680 and 120 distinct review requests.

    The same seed always gives the same lists, and no held-out prompt appears in train.
    """
    train, heldout = _split_specs(seed)
    return [spec.text for spec in train], [spec.text for spec in heldout]


# --------------------------------------------------------------------------------------
# Gold judge


@lru_cache(maxsize=1)
def _vader():
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError as error:
        raise RlhfkitError(
            "the demo's gold judge needs vaderSentiment: run `pip install vaderSentiment`"
        ) from error
    return SentimentIntensityAnalyzer()


def gold_score(texts: list[str]) -> list[float]:
    """VADER compound sentiment of each text, in [-1, 1] (higher = more positive)."""
    analyzer = _vader()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in texts]


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward function for the demo: the VADER compound score of each response."""
    if len(prompts) != len(responses):
        raise ValueError(f"gold_reward got {len(prompts)} prompts but {len(responses)} responses")
    return gold_score(responses)


def sentiment_label(score: float) -> str:
    """'positive', 'negative' or 'neutral' by VADER's usual +-0.05 thresholds."""
    if score >= POSITIVE_THRESHOLD:
        return "positive"
    if score <= NEGATIVE_THRESHOLD:
        return "negative"
    return "neutral"


# --------------------------------------------------------------------------------------
# Supervised warm-up data

_SENTENCE_END = re.compile(r"[.!?](\s|$)")


def is_one_sentence(text: str) -> bool:
    """True if `text` is a single sentence ending with a period."""
    text = text.strip()
    return text.endswith(".") and len(_SENTENCE_END.findall(text)) == 1 and "\n" not in text


def _capitalize(text: str) -> str:
    return text[:1].upper() + text[1:]


def _review_slots(spec: PromptSpec, rng: random.Random) -> dict[str, str]:
    """The values a review template may use, drawn from the prompt plus random phrasing."""
    element = rng.choice(GENRES[spec.genre])
    pos, neg, plain = (rng.choice(pool) for pool in (POSITIVE_ADJECTIVES, NEGATIVE_ADJECTIVES, PLAIN_ADJECTIVES))
    slots = {
        "genre": spec.genre,
        "element": element,
        "Element": _capitalize(element),
        "pos": pos,
        "neg": neg,
        "plain": plain,
        "A_pos": _capitalize(_with_article(pos)),
        "A_plain": _capitalize(_with_article(plain)),
    }
    if spec.setting is not None:
        slots.update(where=spec.setting.where, place=spec.setting.place, Place=_capitalize(spec.setting.place))
    if spec.era is not None:
        slots["era"] = spec.era
    if spec.subject is not None:
        slots["subj"] = _definite(spec.subject)
    return slots


def write_review(spec: PromptSpec, sentiment: str, rng: random.Random) -> str | None:
    """A one-sentence review of `spec` meant to read as `sentiment`, checked with VADER.

    Tries a few templates that fit the prompt's slots; returns None if none of them both
    fits in MAX_REVIEW_WORDS and gets the intended VADER label.
    """
    pool = _REVIEW_POOLS[sentiment]
    for _ in range(12):
        slots = _review_slots(spec, rng)
        usable = [t for t in pool if _fields(t) <= slots.keys()]
        review = _capitalize(rng.choice(usable).format(**slots))
        if len(review.split()) > MAX_REVIEW_WORDS or not is_one_sentence(review):
            continue
        if sentiment_label(gold_score([review])[0]) == sentiment:
            return review
    return None


def sft_examples(seed: int = 0, num_examples: int = NUM_SFT_EXAMPLES) -> list[dict[str, str]]:
    """Alpaca-style SFT rows {"instruction": prompt, "output": review} from train prompts.

    Reviews come in equal thirds of positive, negative and neutral sentiment (by VADER), so
    the SFT model learns the format without already preferring upbeat reviews; PPO then has
    to learn the preference from the reward model.
    """
    train, _ = _split_specs(seed)
    rng = random.Random(f"rlhfkit-demo-sft-{seed}")
    order = list(train)
    rng.shuffle(order)
    sentiments = ("positive", "negative", "neutral")
    rows: list[dict[str, str]] = []
    for spec in order:
        if len(rows) >= num_examples:
            break
        review = write_review(spec, sentiments[len(rows) % 3], rng)
        if review is not None:
            rows.append({"instruction": spec.text, "output": review})
    return rows
