"""The grounded prompt: a passage gemma 3 270M copies from its first word, greedy. Shared by the
slow engine tests and ``bench/speculative.py`` (its grounded row)."""

PASSAGE = (
    "The lighthouse stood on a narrow spit of rock at the mouth of the harbour. Every evening, "
    "as the sun went down behind the western hills, the keeper climbed the one hundred and "
    "twelve steps of the spiral staircase, trimmed the wick, polished the great lens, and lit "
    "the lamp. Its beam swept across the water every ten seconds, warning the fishing boats "
    "away from the reef that lay hidden just below the surface. In the morning he put the lamp "
    "out, wrote the weather in his logbook, and walked down to the village for bread and news."
)
COPY = f"Copy the following passage exactly, word for word.\n\nPassage:\n{PASSAGE}\n\nCopy:\n"
