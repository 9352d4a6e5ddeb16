"""The artifact every stage and every host shares; `artifact.contract` defines it."""
