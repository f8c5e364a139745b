"""Quickstart: a word count where futures flow from task to task.

Each document is counted by one task; the partial counts are merged
pairwise by tasks that take the previous tasks' *futures* as arguments. The
caller never fetches an intermediate result: each merge starts as soon as
its two inputs exist, and receives their values in its worker.

Run: python3 examples/quickstart.py
"""

from collections import Counter

from futurepool import ProcessPoolExecutor

DOCUMENTS = [
    "the quick brown fox jumps over the lazy dog",
    "the dog barks and the fox runs",
    "a lazy afternoon for a quick fox",
    "brown dogs and brown foxes are friends",
] * 4


def count_words(text):
    return Counter(text.split())


def merge(left, right):
    return left + right


def main():
    with ProcessPoolExecutor(max_workers=2) as pool:
        level = [pool.submit(count_words, doc) for doc in DOCUMENTS]
        while len(level) > 1:  # a reduction tree of futures, no waiting here
            pairs = zip(level[0::2], level[1::2])
            level = [pool.submit(merge, a, b) for a, b in pairs] + level[len(level) // 2 * 2:]
        total = level[0].result(timeout=60)
    for word, count in total.most_common(5):
        print(f"{word:>8} {count}")
    # Lambdas and closures work too: code travels by value.
    with ProcessPoolExecutor(max_workers=2) as pool:
        print("squares:", list(pool.map(lambda x: x * x, range(8))))


if __name__ == "__main__":
    main()
