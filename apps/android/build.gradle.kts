// Plugin versions: Android Gradle plugin 8.5 (Gradle 8.7+), Kotlin 2.0 with its Compose compiler plugin
// (https://developer.android.com/develop/ui/compose/compiler). Not built in CI: see README.md.
plugins {
    id("com.android.application") version "8.5.2" apply false
    id("com.android.library") version "8.5.2" apply false
    id("org.jetbrains.kotlin.android") version "2.0.21" apply false
    id("org.jetbrains.kotlin.plugin.compose") version "2.0.21" apply false
}
