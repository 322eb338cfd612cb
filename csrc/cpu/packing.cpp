#include "opdcore/packing.h"
