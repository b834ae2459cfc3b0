// The headers every ISA build of the tuned kernels needs, included before any
// target pragma (so that their inline functions stay baseline code); the
// tuned/*.inc fragments include nothing themselves.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "../../loss_value.h"
#include "../cpu_impl.h"
#include "../busy_core.h"
#include "../pool.h"
#include "../tuning.h"
