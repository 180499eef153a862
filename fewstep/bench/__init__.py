"""The offline bench world: corpora from data installed on the machine, judges, mini benches."""
