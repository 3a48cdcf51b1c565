"""Names, categories, attributes and variant groups of the emoji that ``bundled:openmoji`` renders.

Everything here is derived from the ``emoji`` package's ``EMOJI_DATA`` (English short
names such as ``:person_medium_skin_tone_red_hair:``; it has no Unicode group data) and
from the code points themselves; ``tasks/data/openmoji.py`` draws the images.

Names: the short name in the CLDR form, modifiers after a colon —
``:person_medium_skin_tone_red_hair:`` -> "person: medium skin tone, red hair",
``:family_man_woman_boy:`` -> "family: man, woman, boy", ``:Kuwait:`` -> "flag: Kuwait",
``:keycap_#:`` -> "keycap: #".

Category (the label; :data:`CATEGORIES`, after the Unicode emoji groups), first rule
that applies:

1. flags: a regional-indicator pair, a tag sequence, or a flag code point (chequered,
   triangular, crossed, white, black flag) first;
2. people & body: any entry of a group that has a skin-tone variant (every Unicode
   Emoji_Modifier_Base is a person or a body part), or a code point listed for it below;
3. otherwise by the first code point (U+FE0F ignored): :data:`EXCEPTIONS`, then
   :data:`BLOCKS` — ranges following the Unicode blocks and the order emoji were added
   in (e.g. U+1F600-1F64F emoticons -> smileys & emotion, U+1F400-1F43F -> animals &
   nature, U+1F680-1F6FF transport -> travel & places), with single code points moved
   to their Unicode group (U+1F382 birthday cake -> food & drink);
4. anything left: symbols.

Group (``split_of_group`` keeps a group in one split): the code points with U+FE0F,
skin tones (U+1F3FB-1F3FF), "ZWJ + gender sign", "ZWJ + hair" (U+1F9B0-1F9B3) and
"ZWJ + right arrow" (facing right) removed, and man / woman / person, boy / girl /
child and old man / old woman / older person each mapped to one token. So "woman
detective: dark skin tone" and "detective" share a group, as do "man teacher" and
"woman teacher", and "person: red hair" with "person".

Attributes: ``skin_tone`` (none, light, medium-light, medium, medium-dark, dark; the
first one named) with ``skin_tone_level`` 0-5; ``hair`` (none, red, curly, white, bald,
blond, beard); ``gender``: man / woman / mixed from the words of the name (man, men,
boy, prince, merman, Santa / woman, women, girl, princess, mermaid, Mrs.); person for
other people & body entries whose name has a word of ``_PERSON_WORDS`` (person, people,
family, ninja, ...) or whose group has gendered variants ("detective"); none otherwise
(body parts such as "ear", hands, and entries outside people & body).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import lru_cache

import emoji

CATEGORIES = ("smileys & emotion", "people & body", "animals & nature", "food & drink", "travel & places",
              "activities", "objects", "symbols", "flags")
(SMILEYS, PEOPLE, NATURE, FOOD, TRAVEL, ACTIVITIES, OBJECTS, SYMBOLS, FLAGS) = range(len(CATEGORIES))

# Code points (first of the sequence) moved out of the block they sit in.
EXCEPTIONS = {
    SMILEYS: "1F5A4 1F5E8 1F5EF 1FA75-1FA77 1F9D0 1F9E1 1F90D 1F90E",
    PEOPLE: "1FAE6 1F5E3",
    NATURE: "1F4AE 1F490 1F3F5 1F54A 1F577 1F578 2618 1F940",
    FOOD: "1F382 1F52A 1F9AA 1F3FA 2615",
    TRAVEL: "1F4A7 1F525 1F9ED 1F9F1 1FA82 1FAA8 1F488 1F492 1F9BC 1F9BD",
    ACTIVITIES: "1F52E 1F579 1F5BC 1F9F5 1F9F6 1F9F8 1FAA9 1F6F7 2728",
    OBJECTS: "1F484 1F48D 1F48E 1F489 1F48A 1FAE7 1F6AA 1F6AC 1F6BD 1F6BF 1F6C1 1F6CB 1F6CD-1F6CF 1F6D2 1F6D7 1F6E0 "
             "1F6E1 1F9AF 1F941 1FADF 1F9BA 1F3EE",
    SYMBOLS: "1F3E7 1F4B1 1F4B2 1F4DB 1F4F3-1F4F6 1F6AB 1F6AD-1F6B1 1F6B3 1F6B7-1F6BC 1F6BE 1F6C2-1F6C5 1F6D0 1F6DC "
             "1FAAF 2695 269B 269C 1F4A0 1F3A6",
}
BLOCKS = {
    SMILEYS: "1F600-1F64F 1F910-1F92F 1F970-1F97A 1FAE0-1FAEF 1F479-1F480 2620 2639 263A 1F4A9 2763 2764 1F48B 1F48C "
             "1F493-1F49F 1F4A2-1F4AF 1F573",
    PEOPLE: "1F440-1F450 1F463-1F487 1F48F 1F491 1F9B4-1F9BF 1F9CC-1F9DF 1F9E0 1FAC0-1FAC6 1FAF0-1FAFF 1F930-1F93E 26F7",
    NATURE: "1F331-1F335 1F337-1F33C 1F33E-1F344 1F400-1F43F 1F980-1F9AE 1FAB0-1FABF 1FAC7-1FACF",
    FOOD: "1F32D-1F330 1F336 1F33D 1F345-1F37F 1F942-1F944 1F950-1F96F 1F9C0-1F9CB 1FAD0-1FADF",
    TRAVEL: "1F300-1F32C 1F3A0-1F3A2 1F3AA 1F3CD 1F3CE 1F3D4-1F3F0 1F54B-1F54D 1F550-1F567 1F570 1F5FA-1F5FF "
            "1F680-1F6FF 231A 231B 23F0-23F3 2600-2604 2614 26A1 26C4 26C5 26C8 26E9 26EA 26F0-26F2 26F4 26F5 26FA "
            "26FD 2708 2744 2B50 1FA90 1FA8B",
    ACTIVITIES: "1F380-1F391 1F396 1F397 1F39F 1F3A3 1F3A8 1F3AB 1F3AD-1F3B4 1F3BD-1F3C0 1F3C5 1F3C6 1F3C8 1F3C9 "
                "1F3CF-1F3D3 1F3F8 1F004 1F0CF 2660-2666 265F 26BD 26BE 26F3 26F8 1F93F 1F945-1F94F 1F9E7-1F9E9 "
                "1F9FF 1FA80-1FA86",
    OBJECTS: "1F392 1F393 1F399-1F39B 1F39E 1F3A4 1F3A5 1F3A7 1F3A9 1F3AC 1F3B5-1F3BC 1F3F7 1F3F9 1F451-1F462 "
             "1F4A1 1F4B0-1F4FF 1F507-1F517 1F526-1F52D 1F56F 1F576 1F587-1F5F3 1F97B-1F97F 1F9E2-1F9E6 1F9EA-1F9FE "
             "1FA70-1FA7C 1FA87-1FA8F 1FA91-1FAAF 2328 260E 2692-2699 26B0 26B1 26CF 26D1 26D3 2702 2709 270F 2712",
}
FLAG_STARTS = {0x1F3C1, 0x1F6A9, 0x1F38C, 0x1F3F3, 0x1F3F4}

SKIN_TONES = ("none", "light", "medium-light", "medium", "medium-dark", "dark")
SKIN_CODEPOINTS = range(0x1F3FB, 0x1F400)  # light .. dark, in SKIN_TONES[1:] order
HAIRS = ("none", "red", "curly", "white", "bald", "blond", "beard")
GENDERS = ("none", "person", "man", "woman", "mixed")
ATTRIBUTE_NAMES = ("skin_tone", "skin_tone_level", "hair", "gender", "name", "short_name", "codepoints")

ZWJ, VS16 = 0x200D, 0xFE0F
_STRIPPED_AFTER_ZWJ = {0x2640, 0x2642, 0x27A1, 0x1F9B0, 0x1F9B1, 0x1F9B2, 0x1F9B3}
_TOKENS = {**dict.fromkeys((0x1F468, 0x1F469, 0x1F9D1), "P"), **dict.fromkeys((0x1F466, 0x1F467, 0x1F9D2), "C"),
           **dict.fromkeys((0x1F474, 0x1F475, 0x1F9D3), "O")}
_MODIFIER = re.compile(r"\b((?:medium-light|medium-dark|medium|light|dark) skin tone|(?:red|curly|white|blond) hair"
                       r"|bald|beard)\b")
_PERSON_WORDS = {"person", "people", "adult", "child", "baby", "family", "couple", "kiss", "claus", "dancer", "ninja",
                 "skier", "snowboarder", "troll", "silhouette"}
_MOD_PHRASES = {"bald": "a bald head", "beard": "a beard"}
_MEMBER_PREFIXES = ("family", "kiss", "couple with heart")
_MEMBERS = {"man", "woman", "boy", "girl", "adult", "child", "person"}
_MALE, _FEMALE = {"man", "men", "boy", "prince", "merman", "santa"}, {"woman", "women", "girl", "princess", "mermaid", "mrs."}


def _parse_ranges(spec: str) -> tuple[tuple[int, int], ...]:
    out = []
    for part in spec.split():
        lo, _, hi = part.partition("-")
        out.append((int(lo, 16), int(hi or lo, 16)))
    return tuple(out)


_EXCEPTION_RANGES = {cat: _parse_ranges(s) for cat, s in EXCEPTIONS.items()}
_BLOCK_RANGES = {cat: _parse_ranges(s) for cat, s in BLOCKS.items()}


@dataclass(frozen=True)
class EmojiEntry:
    sequence: str
    short_name: str  # the emoji package's, e.g. ":red_apple:"
    name: str  # CLDR form, e.g. "person: medium skin tone, red hair"
    phrase: str  # for captions, e.g. "person with medium skin tone and red hair"
    category: int
    group: str
    skin_tone: str
    hair: str
    gender: str

    @property
    def codepoints(self) -> str:
        return "-".join(f"{ord(c):04X}" for c in self.sequence)

    def attributes(self) -> dict[str, float | str]:
        return {"skin_tone": self.skin_tone, "skin_tone_level": float(SKIN_TONES.index(self.skin_tone)),
                "hair": self.hair, "gender": self.gender, "name": self.name, "short_name": self.short_name,
                "codepoints": self.codepoints}


def is_flag(cps: list[int]) -> bool:
    return (0x1F1E6 <= cps[0] <= 0x1F1FF or cps[0] in FLAG_STARTS or any(0xE0020 <= c <= 0xE007F for c in cps))


def has_skin_tone(sequence: str) -> bool:
    return any(ord(c) in SKIN_CODEPOINTS for c in sequence)


def variant_group(sequence: str) -> str:
    """The group key shared by the skin-tone, gender, hair and direction variants."""
    cps = [ord(c) for c in sequence if ord(c) != VS16 and ord(c) not in SKIN_CODEPOINTS]
    parts: list[str] = []
    i = 0
    while i < len(cps):
        if cps[i] == ZWJ and i + 1 < len(cps) and cps[i + 1] in _STRIPPED_AFTER_ZWJ:
            i += 2
            continue
        if cps[i] != ZWJ:
            parts.append(_TOKENS.get(cps[i], f"{cps[i]:X}"))
        i += 1
    return "openmoji:" + "-".join(parts)


def category_of(sequence: str, group_has_skin_tones: bool) -> int:
    """The category index of ``sequence`` (rules in the module docstring)."""
    cps = [ord(c) for c in sequence if ord(c) != VS16]
    if is_flag(cps):
        return FLAGS
    if group_has_skin_tones or has_skin_tone(sequence):
        return PEOPLE
    for table in (_EXCEPTION_RANGES, _BLOCK_RANGES):
        for cat, ranges in table.items():
            if any(lo <= cps[0] <= hi for lo, hi in ranges):
                return cat
    return SYMBOLS


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def names(short_name: str, flag: bool) -> tuple[str, str, list[str]]:
    """(CLDR-style name, caption phrase, modifiers) from an ``emoji`` short name."""
    text = short_name.strip(":").replace("_", " ")
    mods = _MODIFIER.findall(text)
    base = " ".join(_MODIFIER.sub(" ", text).split())
    members: list[str] = []
    for prefix in _MEMBER_PREFIXES:
        rest = base[len(prefix):].split()
        if base.startswith(prefix + " ") and rest and all(w in _MEMBERS for w in rest):
            base, members = prefix, rest
    if flag and "flag" not in base.lower():
        return f"flag: {base}", f"flag of {base}", []
    if base.startswith("keycap ") and not mods:
        return f"keycap: {base[7:]}", f"keycap {base[7:]}", []
    details = members + mods
    name = f"{base}: {', '.join(details)}" if details else base
    phrase = base
    if members:
        phrase = f"{base} of {_join(members)}"
    if mods:
        phrase = f"{phrase} with {_join([_MOD_PHRASES.get(m, m) for m in mods])}"
    return name, phrase, mods


def _gender(base_words: set[str]) -> str:
    male, female = bool(base_words & _MALE), bool(base_words & _FEMALE)
    return "mixed" if male and female else "man" if male else "woman" if female else "person"


@lru_cache(maxsize=1)
def emoji_entries() -> tuple[EmojiEntry, ...]:
    """Every fully-qualified entry of ``emoji.EMOJI_DATA`` (no rendering check), in its order."""
    fq = [(seq, d["en"]) for seq, d in emoji.EMOJI_DATA.items() if d["status"] == emoji.STATUS["fully_qualified"]]
    groups = {seq: variant_group(seq) for seq, _ in fq}
    skin_groups = {groups[seq] for seq, _ in fq if has_skin_tone(seq)}
    out = []
    for seq, short in fq:
        cat = category_of(seq, groups[seq] in skin_groups)
        name, phrase, mods = names(short, cat == FLAGS)
        tones = [m.removesuffix(" skin tone") for m in mods if m.endswith("skin tone")]
        hairs = [m.removesuffix(" hair") for m in mods if not m.endswith("skin tone")]
        gender = _gender(_words(name)) if cat == PEOPLE else "none"
        out.append(EmojiEntry(sequence=seq, short_name=short, name=name, phrase=phrase, category=cat,
                              group=groups[seq], skin_tone=tones[0] if tones else "none",
                              hair=hairs[0] if hairs else "none", gender=gender))
    gendered = {e.group for e in out if e.gender in ("man", "woman", "mixed")}
    # A body part ("ear", "eyes") is not a person; a gender-neutral member of a gendered group is.
    return tuple(e if e.gender != "person" or e.group in gendered or _mentions_person(e.name)
                 else replace(e, gender="none") for e in out)


def _words(name: str) -> set[str]:
    return set(name.lower().replace(",", " ").replace(":", " ").split())


def _mentions_person(name: str) -> bool:
    return bool(_words(name) & _PERSON_WORDS)

