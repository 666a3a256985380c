"""Plugin models, by the name a user types (``--model=NAME``), as ``module:Class``.

Imports are lazy so that ``--model=SASRec`` never pays for transformers or sentence-transformers.
A new model adds one line here, its file under ``recbole_genrec/model/`` and its yaml under
``properties/model/``.
"""

MODEL_REGISTRY = {
    "TIGER": "recbole_genrec.model.tiger:TIGER",
    "LETTER": "recbole_genrec.model.letter:LETTER",
    "SimGR": "recbole_genrec.model.simgr:SimGR",
    "TokenWeightedTIGER": "recbole_genrec.model.token_weighted_tiger:TokenWeightedTIGER",
    "ETEGRec": "recbole_genrec.model.etegrec:ETEGRec",
    "TIGER++": "recbole_genrec.model.genplugin:TIGERPlusPlus",  # GenPlugin (Yang et al., DASFAA 2026) over TIGER
    "LETTER++": "recbole_genrec.model.genplugin:LETTERPlusPlus",  # GenPlugin over LETTER-TIGER
    "SODA-T": "recbole_genrec.model.soda:SODAT",  # SODA on TIGER (docs/soda.md)
    "SODA-L": "recbole_genrec.model.soda:SODAL",  # SODA on LETTER
    "SODA-E": "recbole_genrec.model.soda:SODAE",  # SODA on ETEGRec
    "Pop": "recbole_genrec.model.pop:Pop",  # RecBole's Pop counting each positive interaction once (see its file)
}
