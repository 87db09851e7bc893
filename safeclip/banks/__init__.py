"""Banks of known content: lists of PDQ hashes and CLIP exemplars that a policy matches every input against.

A bank is a folder (:class:`Bank`): a manifest of entries (id, label, source, added time, enabled) and their rows,
``pdq`` (256-bit hashes, matched by Hamming distance; optionally the 8 dihedral variants of each added image, so
rotations and flips match) or ``embedding`` (image embeddings of one ``encoder_id``, matched by cosine similarity;
exact while small, an approximate index above). Policies name banks per category with a threshold and an effect
(``deny`` forces an action, ``allow`` overrides a known false positive); the score stage matches them
(:class:`PolicyBanks`) and the decide stage applies what they force.

>>> import tempfile, numpy as np
>>> bank = Bank.create(tempfile.mkdtemp() + "/incidents", "pdq")
>>> bank.add(np.zeros((1, 32), np.uint8), [NewEntry("e1", label="demo")])
['e1']
>>> [e.id for e in bank.entries()]
['e1']
"""

from __future__ import annotations

from ..bankmeta import BANK_KINDS, bank_kind, is_bank, read_meta
from ._add import FileHashes, add_files, add_from_parquet, expand_paths, hash_file
from ._csv import import_pdq_csv, read_pdq_csv, write_pdq_csv
from ._hits import HitLog
from ._signal import MIN_PDQ_QUALITY, NO_HASH, BankMatch, BankSignal, PolicyBanks
from ._store import Bank, BankEntry, NewEntry

__all__ = ["BANK_KINDS", "MIN_PDQ_QUALITY", "NO_HASH", "Bank", "BankEntry", "BankMatch", "BankSignal", "FileHashes",
           "HitLog", "NewEntry", "PolicyBanks", "add_files", "add_from_parquet", "bank_kind", "expand_paths",
           "hash_file", "import_pdq_csv", "is_bank", "read_meta", "read_pdq_csv", "write_pdq_csv"]
