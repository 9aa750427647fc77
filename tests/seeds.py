"""Fresh seeds for tests that draw new random inputs each run (from the OS, not torch's global
generator, which other tests seed)."""

import random


def fresh_seed() -> int:
    return random.SystemRandom().randrange(2**31)
