"""Per-method data wiring: ``pipelines/methods/<method>.py`` defines ``training_inputs(...)``.

A method whose training needs only the encoded pairs has no module here; one
with data steps of its own (SmPO: reward scoring, smoothing, inversion) wires
them in its module, which the alignment pipeline finds by the method's name.
"""
