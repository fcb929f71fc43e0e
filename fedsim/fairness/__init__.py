"""Local and global group fairness: information-theoretic disparities, their partial information
decomposition (`pid`), the accuracy / fairness frontier (`aglfop`), and the confusion counts
clients report (`groups`)."""
