"""The built-in synthetic shop: the dataset fedrec runs on out of the box.

Its structure is the one a shopping guide should find: each shopper's taste is concentrated on a
few categories and price bands, a session stays in one category and tends to stay with a brand,
and item popularity follows a Zipf law. A model that reads a shopper's history therefore beats
popularity by a wide margin, and one that reads the order of the history does better still.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedrec.config import SyntheticDatasetConfig
from fedrec.data.dataset import Dataset, RawData, build_dataset

CATEGORIES = (
    ("Shoes", ("Sneakers", "Boots", "Loafers", "Sandals")),
    ("Outerwear", ("Parka", "Raincoat", "Fleece", "Blazer")),
    ("Kitchen", ("Skillet", "Kettle", "Knife Set", "Blender")),
    ("Books", ("Novel", "Cookbook", "Atlas", "Memoir")),
    ("Toys", ("Puzzle", "Robot Kit", "Plush Bear", "Train Set")),
    ("Garden", ("Trowel", "Planter", "Hose", "Seed Kit")),
    ("Beauty", ("Serum", "Lipstick", "Face Mask", "Perfume")),
    ("Audio", ("Headphones", "Speaker", "Turntable", "Earbuds")),
    ("Sports", ("Yoga Mat", "Dumbbells", "Racket", "Bike Helmet")),
    ("Games", ("Board Game", "Card Game", "Controller", "Chess Set")),
    ("Pets", ("Dog Bed", "Cat Tree", "Leash", "Aquarium")),
    ("Office", ("Notebook", "Desk Lamp", "Fountain Pen", "Organizer")),
)
BRAND_STEMS = ("Nor", "Vel", "Ast", "Kal", "Mer", "Tor", "Lun", "Qui", "Ser", "Dra", "Pel", "Orn")
BRAND_ENDS = ("da", "ex", "ora", "is", "ano", "ik", "eo", "um")
ADJECTIVES = ("Classic", "Compact", "Deluxe", "Everyday", "Pro", "Eco", "Cozy", "Smart")
PRICE_BANDS = ("$", "$$", "$$$", "$$$$", "$$$$$", "$$$$$$")
# Chance that the next item of a session is of the brand of the item before it.
BRAND_STICKINESS = 0.5
# Preference weight for price bands one step away from the shopper's own band.
PRICE_FALLOFF = 0.25


def generate_shop(cfg: SyntheticDatasetConfig) -> Dataset:
    rng = np.random.default_rng(cfg.seed)
    category, brand, price, popularity = _catalogue(cfg, rng)
    raw = RawData(
        interactions=_sessions(cfg, rng, category, brand, price, popularity),
        item_attributes={},
        item_titles={},
    )
    for item in range(cfg.num_items):
        cat_name, nouns = _category(category[item])
        brand_name = _brand_name(category[item], brand[item], cfg.brands_per_category)
        band = PRICE_BANDS[price[item]] if price[item] < len(PRICE_BANDS) else f"band{price[item]}"
        raw.item_attributes[str(item)] = [
            f"category={cat_name}", f"brand={brand_name}", f"price={band}"]
        noun = nouns[item % len(nouns)]
        raw.item_titles[str(item)] = f"{brand_name} {ADJECTIVES[item % len(ADJECTIVES)]} {noun}"
    return build_dataset(cfg.name, raw, min_rating=cfg.min_rating, kcore=cfg.kcore,
                         source=f"synthetic shop (seed={cfg.seed})")


def _catalogue(
    cfg: SyntheticDatasetConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Category, brand, price band and Zipf popularity of every item."""
    # Every category gets at least one item; the rest are spread at random.
    category = np.concatenate([
        np.arange(cfg.num_categories),
        rng.integers(0, cfg.num_categories, cfg.num_items - cfg.num_categories),
    ])
    rng.shuffle(category)
    brand = rng.integers(0, cfg.brands_per_category, cfg.num_items)
    price = rng.integers(0, cfg.num_price_bands, cfg.num_items)
    rank = rng.permutation(cfg.num_items) + 1
    popularity = rank.astype(np.float64) ** -cfg.zipf_exponent
    return category, brand, price, popularity


def _sessions(
    cfg: SyntheticDatasetConfig,
    rng: np.random.Generator,
    category: np.ndarray,
    brand: np.ndarray,
    price: np.ndarray,
    popularity: np.ndarray,
) -> pd.DataFrame:
    items_of = [np.flatnonzero(category == c) for c in range(cfg.num_categories)]
    bands = np.arange(cfg.num_price_bands)
    users, items, times = [], [], []
    for user in range(cfg.num_users):
        taste = rng.dirichlet(np.full(cfg.num_categories, cfg.taste_concentration))
        own_band = rng.integers(cfg.num_price_bands)
        band_weight = PRICE_FALLOFF ** np.abs(bands - own_band)
        seen: set[int] = set()
        clock = int(rng.integers(0, 10**6))
        for _ in range(1 + rng.poisson(cfg.sessions_per_user - 1)):
            clock += int(rng.integers(3600, 30 * 86400))
            pool = items_of[rng.choice(cfg.num_categories, p=taste)]
            weight = popularity[pool] * band_weight[price[pool]]
            previous = -1
            for _ in range(1 + rng.poisson(cfg.items_per_session - 1)):
                w = weight.copy()
                w[[i for i, item in enumerate(pool) if item in seen]] = 0.0
                if previous >= 0 and rng.random() < BRAND_STICKINESS:
                    same = brand[pool] == brand[previous]
                    if (w * same).sum() > 0:
                        w = w * same
                if w.sum() == 0:
                    break
                previous = int(pool[rng.choice(len(pool), p=w / w.sum())])
                seen.add(previous)
                clock += int(rng.integers(10, 600))
                users.append(user)
                items.append(previous)
                times.append(clock)
    return pd.DataFrame({"user": np.array(users).astype(str), "item": np.array(items).astype(str),
                         "order": np.array(times, dtype=np.int64)})


def _category(index: int) -> tuple[str, tuple[str, ...]]:
    if index < len(CATEGORIES):
        return CATEGORIES[index]
    name = f"Category {index + 1}"
    return name, (f"{name} Item",)


def _brand_name(category: int, brand: int, brands_per_category: int) -> str:
    code = category * brands_per_category + brand
    stem = BRAND_STEMS[code % len(BRAND_STEMS)]
    end = BRAND_ENDS[(code // len(BRAND_STEMS)) % len(BRAND_ENDS)]
    suffix = code // (len(BRAND_STEMS) * len(BRAND_ENDS))
    return f"{stem}{end}" + (f" {suffix + 1}" if suffix else "")
