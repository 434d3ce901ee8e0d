"""Reference implementations: the papers' formulation of each rule, written independently of
the nets' fast code, against which the product is checked (tests) and timed (``eprun bench``)."""
