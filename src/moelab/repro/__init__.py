"""Paper claims checked at small scale: each reproduction trains, measures and gives a verdict."""
