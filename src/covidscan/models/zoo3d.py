"""Built-in 3D registry entries (study C): 3D ResNets and R(2+1)D. Importing registers them."""
