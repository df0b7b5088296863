//! EDM hyper-parameters.

use serde::{Deserialize, Serialize};

/// EDM hyper-parameters (Karras et al. 2022) as the reference sets them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EdmConfig {
    pub sigma_min: f64,
    pub sigma_max: f64,
    #[serde(rename = "P_mean")]
    pub p_mean: f64,
    #[serde(rename = "P_std")]
    pub p_std: f64,
    pub sigma_data: f64,
    pub rho: f64,
}

impl Default for EdmConfig {
    fn default() -> Self {
        Self {
            sigma_min: 0.002,
            sigma_max: 80.0,
            p_mean: -0.6,
            p_std: 1.2,
            sigma_data: 0.9,
            rho: 7.0,
        }
    }
}
