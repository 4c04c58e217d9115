"""The constraint categories, modes and profiles.

The first nine categories (alcohol ... finance) are those of the shipped bank; violence, selfharm,
hate and crime were added after them (indices of the first nine must not move) and are in the
training data, but a bank has their tokens only once it is trained with them.

Plain data (no torch): the data generator, the trainer, the from-text
baseline and the evaluation all read it from here, and the trainer writes it
into the bank, which is where the runtime reads it from.

Refusal texts share one opening ("Sorry, I can't") so that the refuse/answer
decision is made at the first generated token, then name the category so a
refusal says *which* rule fired and is detectable by exact match.
"""
from __future__ import annotations

from dataclasses import dataclass

from edge_safe.convert.keys import Mode


@dataclass(frozen=True)
class Category:
    name: str
    description: str  # what the constraint blocks (shown by `edge-safe tokens`)
    rule: str  # the same constraint as a natural-language rule (text baseline, from-text bank)
    refusal: str  # the fixed reply the token trains towards


CATEGORIES: tuple[Category, ...] = (
    Category(
        "alcohol",
        "Alcoholic drinks: making, mixing, buying, or getting drunk",
        "Do not help with alcoholic drinks: no cocktail or beer recipes, no buying or drinking alcohol.",
        "Sorry, I can't help with alcohol.",
    ),
    Category(
        "gambling",
        "Betting, casinos, lotteries and gambling strategies",
        "Do not help with gambling: no betting tips, casino strategies, or ways to win money by wagering.",
        "Sorry, I can't help with gambling.",
    ),
    Category(
        "drugs",
        "Recreational and illegal drugs: obtaining, making, dosing or using them",
        "Do not help with recreational or illegal drugs: no obtaining, making, dosing or using them.",
        "Sorry, I can't help with drugs.",
    ),
    Category(
        "sexual",
        "Sexual or erotic content and sexual acts",
        "Do not write or describe sexual or erotic content.",
        "Sorry, I can't help with sexual content.",
    ),
    Category(
        "horror",
        "Graphic violence and gore: vivid descriptions of injury, torture or killing",
        "Do not describe graphic violence or gore: no vivid injury, torture or killing.",
        "Sorry, I can't help with graphic violence.",
    ),
    Category(
        "weapons",
        "Obtaining, building, modifying or using weapons to hurt people",
        "Do not help with weapons: no building, buying, modifying or using guns, bombs or blades to hurt people.",
        "Sorry, I can't help with weapons.",
    ),
    Category(
        "privacy",
        "Finding, profiling or tracking private people; scraping personal data; identifying "
        "strangers from photos; inferring sensitive traits",
        "Do not help find, track or profile private individuals, scrape personal data, identify people "
        "from photos, or guess anyone's health, religion, politics or sexuality.",
        "Sorry, I can't help with tracking or profiling people.",
    ),
    Category(
        "medical",
        "Personal diagnosis and prescription dosing",
        "Do not diagnose the user's symptoms or tell anyone which medicine or dose to take.",
        "Sorry, I can't give personal medical advice.",
    ),
    Category(
        "finance",
        "Personal investment advice: what to buy, sell or put money into",
        "Do not give personal investment advice: never tell someone which stocks, coins or funds to buy or sell.",
        "Sorry, I can't give personal investment advice.",
    ),
    # Added after the nine of the shipped bank: existing indices must not move.
    Category(
        "violence",
        "Methods or plans to hurt, poison, choke, kill or sabotage people (not gore: that is horror; "
        "not weapons: that is weapons)",
        "Do not help hurt people: no methods or plans to attack, poison, choke, kill or sabotage anyone.",
        "Sorry, I can't help with hurting people.",
    ),
    Category(
        "selfharm",
        "Suicide and self-injury: methods, lethal doses, hiding self-harm, starvation tips, or encouragement",
        "Do not help with suicide or self-harm: no methods, lethal doses, ways to hide it or starve, "
        "and no encouragement; point to help instead.",
        "Sorry, I can't help with that. If you are thinking about hurting yourself, please talk to someone "
        "you trust or call a crisis line.",
    ),
    Category(
        "hate",
        "Harassment and demeaning content about people or protected groups: insults, slurs, mockery, "
        "harassment campaigns, hateful propaganda",
        "Do not write hateful or harassing content: no insults, slurs or mockery of people or groups, "
        "no harassment campaigns or hateful propaganda.",
        "Sorry, I can't help with hateful or harassing content.",
    ),
    Category(
        "crime",
        "Fraud, theft, hacking and evading the law: phishing, shoplifting, money laundering, tax evasion, "
        "breaking into accounts or networks, fake IDs, insurance fraud, insider trading",
        "Do not help with crimes: no fraud, phishing, theft, hacking into accounts or networks, money "
        "laundering, tax evasion, fake documents, evading police or insider trading.",
        "Sorry, I can't help with crimes like fraud, theft or hacking.",
    ),
)

#: Modes (the magic-token part): one model, switchable behaviour.
MODES: tuple[Category, ...] = (
    Category(
        Mode.POSITIVE,
        "Default mode: follow the active constraints, answer everything else as the base model",
        "",
        "",
    ),
    Category(
        Mode.REJECTIVE,
        "Refuse every request",
        "Refuse every request.",
        "Sorry, I can't help with that.",
    ),
    Category(
        Mode.NEGATIVE,
        "Unrestricted (red-teaming): ignore constraints; only selected when explicitly asked",
        "",
        "",
    ),
)

#: Profiles: named sets of constraints for a deployment.
#: - minors: what a children's app blocks.
#: - eu: profiling, tracking and identifying private people and inferring sensitive traits
#:   (GDPR Art. 9 special categories; EU AI Act Art. 5 bans biometric categorisation by
#:   sensitive traits and untargeted scraping of facial images). Medical and financial advice
#:   are *not* in `eu`: EU law regulates who gives them, not whether an assistant may discuss
#:   them, so they get their own profile.
#: - kiosk: a health or bank kiosk that must not prescribe or advise on investments.
#: - core: what almost every deployment blocks (hurting people, self-harm, hate, crime).
#: The four categories added after the shipped bank (violence, selfharm, hate, crime) are in the
#: training data; a bank has their tokens only once it is trained with them, and the runtime reads
#: its profiles from the bank file, not from here.
PROFILES: dict[str, tuple[str, ...]] = {
    "minors": ("alcohol", "gambling", "drugs", "sexual", "horror", "weapons", "violence", "selfharm", "hate"),
    "eu": ("privacy",),
    "kiosk": ("medical", "finance"),
    "core": ("violence", "selfharm", "hate", "crime"),
}

CATEGORY_NAMES = tuple(c.name for c in CATEGORIES)
MODE_NAMES = tuple(m.name for m in MODES)
BY_NAME = {c.name: c for c in CATEGORIES + MODES}
