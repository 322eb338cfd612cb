// ATen glue (CPU) for the packed-sequence pad/unpad ops.
#include <torch/library.h>

#include "glue.h"
#include "opdcore/packing.h"
